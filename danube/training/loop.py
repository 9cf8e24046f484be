"""The one training loop. Every stage (pretraining, SFT, ...) runs it; a recipe contributes only
its data (per step: this rank's micro-batches) and whether its loss is normalized per token
over the global batch. Schedules, checkpoints, metrics, validation and resume live here.

A config passed here has the sections `trainer`, `exp_manager` and `model` (with `optim` and
the parallel and batch sizes); each stage's schema provides them.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from megatron.core import parallel_state

from danube.config.compose import config_changes, to_yaml
from danube.config.derived import (
    normalized_precision,
    parse_max_time,
    schedule_counts_tokens,
    schedule_default_horizon,
    tokens_after,
)
from danube.model.builder import build_model_chunks, transformer_config, uses_transformer_engine
from danube.paths import (
    CONFIG_FILE,
    checkpoint_dir_name,
    checkpoint_root,
    exp_dir,
    latest_checkpoint,
    read_meta,
)
from danube.runtime import PrecisionChoice, resolve_precision, use_cuda
from danube.training import checkpoint as ckpt
from danube.training.data_plan import DataPlanChanged, check_resume
from danube.training.engine import (
    build_optimizer,
    build_scheduler,
    uses_distributed_optimizer,
    wrap_for_training,
)
from danube.training.metrics import MetricsLogger
from danube.training.saving import (
    CheckpointWriteFailed,
    finish_saves,
    remove_orphaned_saves,
    save,
    unmeasured_save_seconds,
)
from danube.training.signals import STOPPED_EXIT_CODE, ExitCosts, StopRequests, end_children
from danube.training.step import (
    TOKEN_LOSS_METRICS,
    LossFn,
    evaluate,
    report_means,
    token_loss,
    train_step,
)


@dataclass
class StepData:
    """One global batch as this rank sees it."""

    micro_batches: List[dict]
    """This rank's micro-batches (tokens, labels, loss_mask, position_ids[, attention_mask])."""
    samples: int
    """Samples (sequences, conversations) of the whole global batch."""
    tokens: int
    """Trained tokens of the whole global batch (for tokens/s)."""
    counts: Dict[str, int] = field(default_factory=dict)
    """Per-step counts logged with the step (DPO: masked_pairs)."""
    schedule_increment: int = 1
    """How far this step advances the LR schedule: 1, or its tokens when the schedule counts
    tokens (a ramp whose tokens per step change)."""


def token_metrics(means: Dict[str, float]) -> Dict[str, float]:
    return {"loss": means["lm loss"]}


@dataclass
class Recipe:
    """What a stage brings to the loop."""

    name: str
    train_steps: Callable[[int, int, int], Iterator[StepData]]
    """(first step, last step, consumed samples) -> the steps' data, in order."""
    eval_steps: Callable[[str, int], Optional[Iterator[StepData]]]
    """(split: val | test, global batches) -> their data, or None when the split is empty."""
    per_token_loss: bool = False
    """Normalize the loss by the trained tokens of the whole global batch (megatron-core's
    calculate_per_token_loss) instead of per micro-batch: exact under packing, accumulation
    and data parallelism when micro-batches hold different token counts (DPO: the count is
    pairs)."""
    loss_fn: LossFn = token_loss
    """A micro-batch's loss and report (`danube.training.step.token_loss`'s protocol)."""
    metric_names: Sequence[str] = TOKEN_LOSS_METRICS
    """Names in the reports, reduced to means over the global batch."""
    metrics: Callable[[Dict[str, float]], Dict[str, float]] = token_metrics
    """Means -> the logged metrics ("loss" first)."""
    console: Sequence[str] = ()
    """Metrics shown on the console line beside the loss."""
    perplexity: bool = True
    """Log validation perplexity (token cross-entropy losses)."""
    check_first_step: Optional[Callable[[Dict[str, float]], None]] = None
    """Called with the metrics of step 1 of a run that starts at step 0 (DPO: the policy is
    the reference there); raises to stop the run."""
    data_plan: Optional[dict] = None
    """What fixes the training order (danube.training.data_plan), saved in every checkpoint
    and compared on resume."""
    plan_hint: str = ""
    """How to keep the plan, said when a resume would change it."""


@dataclass
class Trainer:
    """What the loop needs, built once."""

    cfg: object
    model: List
    optimizer: object
    scheduler: object
    device: torch.device
    log: MetricsLogger
    tokenizer: object
    config_yaml: str = ""
    recipe: Optional[Recipe] = None
    step: int = 0
    consumed_samples: int = 0
    last_val_loss: Optional[float] = None
    last_val_step: Optional[int] = None  # the step last_val_loss belongs to
    saves: Optional[object] = None
    """megatron-core's AsyncCallsQueue of the asynchronous saves in flight
    (exp_manager.checkpoint_callback_params.async_save), made at the first one."""
    committed_step: Optional[int] = None
    """The step of the newest checkpoint this run committed or resumed from: what every rank
    decides a save by (never its own view of the filesystem, which may lag on one node)."""
    pending_save: Optional[tuple] = None
    """(step, path) of the asynchronous save in flight."""
    stops: Optional[StopRequests] = None
    costs: ExitCosts = field(default_factory=ExitCosts)
    """Measured durations of what runs before an exit (trainer.max_time's margin)."""
    downstream: Optional[Callable] = None
    """model.downstream_eval's scorer, (model, tokenizer, model config, device, precision) ->
    scores; handed in by the launcher (danube.launch.downstream_scorer)."""


def is_rank0() -> bool:
    return torch.distributed.get_rank() == 0


def barrier() -> None:
    torch.distributed.barrier()


def with_machine_precision(cfg):
    """(cfg with trainer.precision resolved for this machine, the choice): `auto` becomes
    bf16-mixed or 32 before anything is built, so the saved config says what ran."""
    choice = resolve_precision(cfg.trainer.precision, use_cuda(cfg.trainer.accelerator))
    return replace(cfg, trainer=replace(cfg.trainer, precision=choice.precision)), choice


def config_yaml(cfg, choice: PrecisionChoice) -> str:
    """The resolved config as saved (run directory and checkpoints), with why its precision."""
    return f"# trainer.precision={choice.precision}: {choice.reason}\n" + to_yaml(cfg)


def build_trainer(cfg, tokenizer, vocab_size: int, per_token_loss: bool = False) -> Trainer:
    """Model chunks, megatron DDP, optimizer and schedule for `cfg.model` (collective)."""
    m = cfg.model
    device = torch.device(f"cuda:{torch.cuda.current_device()}"
                          if use_cuda(cfg.trainer.accelerator) else "cpu")
    use_te = uses_transformer_engine(m)
    config = transformer_config(m, normalized_precision(cfg.trainer.precision), use_te)
    config.calculate_per_token_loss = per_token_loss
    chunks = to_training_device(
        build_model_chunks(m, config, vocab_size, use_te, getattr(m, "peft", None)), device)
    model = wrap_for_training(
        chunks, config, m.optim,
        parallel_state.get_data_parallel_world_size(with_context_parallel=True))
    optimizer = build_optimizer(m.optim, cfg.trainer.gradient_clip_val, config, model,
                                skip_non_finite=cfg.trainer.nan_policy == "skip")
    tokens = (lambda steps: tokens_after(m, steps)) if schedule_counts_tokens(m) else None
    scheduler = build_scheduler(m.optim, schedule_default_horizon(cfg), optimizer, tokens)
    log = MetricsLogger(exp_dir(cfg.exp_manager), cfg.exp_manager.create_tensorboard_logger,
                        cfg.trainer.max_steps, enabled=is_rank0())
    return Trainer(cfg, model, optimizer, scheduler, device, log, tokenizer)


def to_training_device(chunks: List, device: torch.device) -> List:
    """Every chunk, adapters included, on the current CUDA device before Float16Module and
    DDP wrap it (Megatron-LM's get_model does the same: megatron-core's DDP moves parameters
    into its CUDA buffers only for the distributed optimizer, so with adamw a parameter left on
    the CPU would stay there). On a CPU nothing moves."""
    if device.type == "cuda":
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    return chunks


def agreed_latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint as rank 0 sees it, on every rank: nodes listing a shared
    filesystem at slightly different moments must still load the same step. Collective."""
    choice = [None]
    if is_rank0():
        latest = latest_checkpoint(root)
        choice = [None if latest is None else str(latest)]
    torch.distributed.broadcast_object_list(choice, src=0)
    return None if choice[0] is None else Path(choice[0])


def load_initial(trainer: Trainer, initial_weights: Path, what: str = "initialised weights"
                 ) -> None:
    """The starting weights (fine-tuning); adapters (LoRA) start fresh. A checkpoint written
    by a LoRA run is the adapted model: its adapters are merged into the base weights here
    (the run's own adapters then start fresh on top), which needs the same LoRA targets and
    rank in this run (preflight checks it)."""
    from danube.model.lora import lora_modules, merge_and_restart

    adapted = ckpt.checkpoint_has_adapters(initial_weights)
    if adapted:
        fresh = [(m.lora_a.detach().clone(), m.lora_b.detach().clone())
                 for m in lora_modules(trainer.model)]
        ckpt.load_checkpoint(initial_weights, trainer.model)
        merge_and_restart(trainer.model, ckpt.lora_scale(initial_weights), fresh)
    else:
        ckpt.load_checkpoint(initial_weights, trainer.model, optional=("lora_",))
    # The loaded weights are bf16/fp32 model params; refresh the fp32 main copies.
    trainer.optimizer.reload_model_params()
    trainer.log.info(f"{what} from {initial_weights}"
                     + (" (its LoRA adapters merged into the base weights)" if adapted else ""))


def restore(trainer: Trainer, initial_weights: Optional[Path]) -> None:
    """Resume from this experiment's newest checkpoint, else load `initial_weights`."""
    cfg = trainer.cfg
    dist_opt = uses_distributed_optimizer(cfg.model.optim)
    latest = agreed_latest_checkpoint(checkpoint_root(cfg.exp_manager))
    if cfg.exp_manager.resume_if_exists and latest is not None:
        recipe = trainer.recipe
        rebuilt = check_resume(read_meta(latest).data_plan, recipe.data_plan,
                               cfg.exp_manager.resume_accept_data_plan_change, str(latest),
                               recipe.plan_hint)
        meta = ckpt.load_checkpoint(latest, trainer.model, trainer.optimizer, trainer.scheduler,
                                    dist_opt)
        trainer.step, trainer.consumed_samples = meta.step, meta.consumed_samples
        trainer.committed_step = meta.step
        trainer.last_val_loss = meta.val_loss
        trainer.last_val_step = meta.step if meta.val_loss is not None else None
        trainer.log.info(f"resumed from {latest} (step {meta.step})")
        if rebuilt:
            trainer.log.info(f"warning: {rebuilt}")
        saved = latest / CONFIG_FILE
        changes = config_changes(saved.read_text(), trainer.config_yaml) \
            if saved.is_file() else []
        if changes:
            trainer.log.info("settings changed since that checkpoint (this run's config wins, "
                             "and config.yaml records it):\n  " + "\n  ".join(changes))
    elif initial_weights is not None:
        load_initial(trainer, initial_weights)
    remove_orphaned_saves(trainer)  # the resume point is agreed: no .tmp- save is needed


def _validate(trainer: Trainer, split: str, batches: int) -> Optional[float]:
    recipe = trainer.recipe
    start = time.perf_counter()
    steps = recipe.eval_steps(split, batches) if batches else None
    if steps is None:
        return None
    means = evaluate(trainer.model, [s.micro_batches for s in steps], trainer.device,
                     recipe.loss_fn, recipe.metric_names)
    metrics = recipe.metrics(means)
    trainer.log.log_validation(trainer.step, metrics, split, recipe.perplexity)
    trainer.costs.note("validation", time.perf_counter() - start)
    return metrics["loss"]


def _downstream_due(trainer: Trainer, last: bool) -> bool:
    d = trainer.cfg.model.downstream_eval
    every = d.every_n_steps or trainer.cfg.trainer.val_check_interval
    return bool(d.tasks) and (trainer.step % every == 0 or last)


def _downstream(trainer: Trainer) -> None:
    """model.downstream_eval: benchmarks on the live model (the scorer the launcher handed
    in: evaluation sits above training), logged beside the losses."""
    start = time.perf_counter()
    precision = normalized_precision(trainer.cfg.trainer.precision)
    scores = trainer.downstream(trainer.model, trainer.tokenizer, trainer.cfg.model,
                              trainer.device, precision)
    trainer.log.log_downstream(trainer.step, scores)
    trainer.costs.note("downstream", time.perf_counter() - start)


DIVERGED_EXIT_CODE = 3
CHECKPOINT_FAILED_EXIT_CODE = 4


class Diverged(RuntimeError):
    """A non-finite loss or gradient norm (trainer.nan_policy=stop)."""


# Fault injection for tests of the divergence handling (Megatron-LM's rerun state machine has
# its own): comma-separated steps whose loss is made NaN.
INJECT_NAN_ENV = "DANUBE_INJECT_NAN_AT_STEPS"


def _injected_nan_steps() -> set:
    return {int(s) for s in os.environ.get(INJECT_NAN_ENV, "").split(",") if s.strip()}


def _nan_loss(loss_fn):
    def poisoned(raw, batch, output):
        loss, count, report = loss_fn(raw, batch, output)
        nan = float("nan")
        return loss * nan, count, {name: value * nan for name, value in report.items()}
    return poisoned


def _stop_if_diverged(trainer: Trainer, loss: Optional[float], norm: Optional[float]) -> None:
    """Every rank sees the same all-reduced loss and global norm, so all stop together,
    before this step can be checkpointed (its update already used the bad gradients). A
    non-finite loss makes non-finite gradients, so the norm alone serves on steps whose loss
    is not read."""
    if all(value is None or math.isfinite(value) for value in (loss, norm)):
        return
    raise _diverged(trainer, f"loss {loss}, gradient norm {norm}", "trainer.nan_policy=stop",
                    "this step")


def _diverged(trainer: Trainer, cause: str, setting: str, data: str) -> Diverged:
    """The error a diverged run stops with: the step, what was seen, the setting that
    stopped it, the checkpoint it resumes from and what to change."""
    finish_saves(trainer)  # an earlier, finite step's save in flight commits first
    latest = None if trainer.committed_step is None else \
        checkpoint_root(trainer.cfg.exp_manager) / checkpoint_dir_name(trainer.committed_step)
    return Diverged(
        f"step {trainer.step}: {cause}: the run diverged and stops without saving this step "
        f"({setting}). Last good checkpoint: {latest or 'none'}. Fix: lower model.optim.lr or "
        f"raise warmup, check the data of {data}, then run again (it resumes from that "
        "checkpoint)")


class Stopped(RuntimeError):
    """A stop signal or trainer.max_time: saved, to be resumed."""


def train_loop(trainer: Trainer) -> None:
    trainer.stops = StopRequests(parse_max_time(trainer.cfg.trainer.max_time))
    trainer.costs.unmeasured_save = unmeasured_save_seconds(trainer)
    steps = trainer.recipe.train_steps(trainer.step, trainer.cfg.trainer.max_steps,
                                       trainer.consumed_samples)
    try:
        _train_loop(trainer, steps)
    finally:
        # the step generator owns the data loaders: closing it ends their worker processes
        # now, not whenever (or never, from a traceback's frames) it is collected
        steps.close()
    trainer.stops.restore()


def _stop_margin(trainer: Trainer) -> float:
    """Seconds the next step and everything after it until the exit would take."""
    t, nxt = trainer.cfg.trainer, trainer.step + 1
    last = nxt == t.max_steps
    validates = nxt % t.val_check_interval == 0 or last
    d = trainer.cfg.model.downstream_eval
    downstream = bool(d.tasks) and (nxt % (d.every_n_steps or t.val_check_interval) == 0 or last)
    return trainer.costs.margin(validates, downstream, trainer.pending_save is not None)


def _train_loop(trainer: Trainer, steps: Iterator[StepData]) -> None:
    cfg, t, recipe = trainer.cfg, trainer.cfg.trainer, trainer.recipe
    every = cfg.exp_manager.checkpoint_callback_params.every_n_train_steps
    trainer.log.start(trainer.step)
    if t.run_init_validation and trainer.step == 0 < t.max_steps:
        _validate(trainer, "val", t.limit_val_batches)
    window_time, window_tokens = 0.0, 0  # training time only: not validation, not saving
    poisoned = _injected_nan_steps()
    skipped_in_a_row = 0
    while trainer.step < t.max_steps:
        step_start = time.perf_counter()
        data = next(steps)
        loss_fn = _nan_loss(recipe.loss_fn) if trainer.step + 1 in poisoned else recipe.loss_fn
        totals, lr, grad_norm = train_step(trainer.model, trainer.optimizer, trainer.scheduler,
                                           data.micro_batches, trainer.device, loss_fn,
                                           recipe.metric_names, data.schedule_increment)
        trainer.step += 1
        last = trainer.step == t.max_steps
        logged = trainer.step % t.log_every_n_steps == 0 or last
        norm = None if grad_norm is None else float(grad_norm)
        first_check = recipe.check_first_step is not None and trainer.step == 1
        # The metrics reach the host only when logged (or checked): the gradient norm, a float
        # already when gradients are clipped, watches for divergence on the other steps.
        metrics = None
        if logged or first_check or norm is None:
            metrics = {**recipe.metrics(report_means(totals, recipe.metric_names)),
                       **data.counts}
        # With a grad scaler (nan_policy=skip) megatron returns no norm only for a skipped step.
        if t.nan_policy == "skip" and grad_norm is None:
            skipped_in_a_row += 1
            trainer.log.info(f"step {trainer.step}: non-finite gradients (loss "
                             f"{metrics['loss']}): update skipped (trainer.nan_policy=skip)")
            if t.max_consecutive_skips and skipped_in_a_row >= t.max_consecutive_skips:
                raise _diverged(trainer, f"{skipped_in_a_row} steps in a row had non-finite "
                                "gradients and were skipped",
                                f"trainer.max_consecutive_skips={t.max_consecutive_skips}",
                                "these steps")
        else:
            skipped_in_a_row = 0
            _stop_if_diverged(trainer, None if metrics is None else metrics["loss"], norm)
        if first_check:
            recipe.check_first_step(metrics)
        trainer.consumed_samples += data.samples
        step_time = time.perf_counter() - step_start
        trainer.costs.note("step", step_time)
        window_time, window_tokens = window_time + step_time, window_tokens + data.tokens
        if logged:
            trainer.log.log_train(
                trainer.step, metrics, lr, norm, window_tokens / window_time, step_time,
                trainer.consumed_samples,
                trained_tokens=data.tokens if recipe.per_token_loss else None,
                console=recipe.console)
            window_time, window_tokens = 0.0, 0
        if trainer.step % t.val_check_interval == 0 or last:
            trainer.last_val_loss = _validate(trainer, "val", t.limit_val_batches)
            trainer.last_val_step = trainer.step
        if _downstream_due(trainer, last):
            _downstream(trainer)
        finish_saves(trainer, blocking=False)
        if every and trainer.step % every == 0:
            save(trainer)
        reason = trainer.stops.agreed(_stop_margin(trainer), trainer.device) \
            if not last else None
        if reason is not None:
            finish_saves(trainer)
            # the loop's own record, the same on every rank (not this node's view of the disk)
            if trainer.committed_step != trainer.step:
                save(trainer, blocking=True)
            here = checkpoint_root(cfg.exp_manager) / checkpoint_dir_name(trainer.step)
            raise Stopped(f"stopped after step {trainer.step} for {reason}; saved {here}. Run "
                          "the same command again to resume")
    # The last step, unless already saved (also step 0 with max_steps=0: initial weights).
    finish_saves(trainer)
    if cfg.exp_manager.checkpoint_callback_params.save_last and \
            trainer.committed_step != trainer.step:
        save(trainer, blocking=True)


STOP_MARKER_ENV = "DANUBE_STOP_MARKER"


def _exit_stopped(message: str) -> None:
    """Exit 75 on every rank, within moments of each other: srun --kill-on-bad-exit kills the
    tasks still running when the first exits non-zero, and a killed task's 128+N would hide
    the 75 from the script deciding to requeue. So the slow parts come first (multiprocessing
    children, e.g. dist_checkpointing's writer Manager holding our stdout; what interpreter
    exit would do and os._exit does not; bounded: our children block SIGTERM, so
    multiprocessing's own exit would join them forever), then a barrier, then os._exit.
    Rank 0 also writes $DANUBE_STOP_MARKER (the sbatch script sets it) after the save: the
    script requeues on it even if srun's code was overwritten."""
    end_children()
    marker = os.environ.get(STOP_MARKER_ENV)
    if marker and is_rank0():
        Path(marker).write_text(message + "\n")
    barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(STOPPED_EXIT_CODE)


def run(trainer: Trainer, recipe: Recipe, precision: PrecisionChoice,
        initial_weights: Optional[Path], describe: str,
        downstream: Optional[Callable] = None) -> None:
    """Restore, announce, train, test: the part every stage shares (collective).
    `downstream`: model.downstream_eval's scorer (needed when it names tasks)."""
    cfg, m = trainer.cfg, trainer.cfg.model
    if m.downstream_eval.tasks and downstream is None:
        raise ValueError("model.downstream_eval.tasks is set but no scorer was handed to the "
                         "loop: launch through launchers/ (danube.launch.downstream_scorer)")
    trainer.recipe, trainer.downstream = recipe, downstream
    trainer.config_yaml = config_yaml(cfg, precision)
    if precision.warning:
        trainer.log.info(f"warning: {precision.warning}")
    try:
        restore(trainer, initial_weights)
    except DataPlanChanged as error:  # refused before anything was loaded or written
        if is_rank0():
            print(f"error: {error}", file=sys.stderr, flush=True)
        trainer.log.close()
        sys.exit(2)
    if is_rank0():  # what runs (a refused resume leaves the run directory as it was)
        exp_dir(cfg.exp_manager).mkdir(parents=True, exist_ok=True)
        (exp_dir(cfg.exp_manager) / "config.yaml").write_text(trainer.config_yaml)
    params = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
    dp = parallel_state.get_data_parallel_world_size()
    trainer.log.info(
        f"training {cfg.name} ({recipe.name}): {params / 1e6:.2f}M parameters on rank 0, "
        f"{'Transformer Engine' if uses_transformer_engine(m) else 'local'} layers, "
        f"precision {cfg.trainer.precision} ({precision.reason}), "
        f"TP {m.tensor_model_parallel_size} PP {m.pipeline_model_parallel_size} DP {dp}"
        f"; step {trainer.step} -> {cfg.trainer.max_steps}, {describe}")
    try:
        train_loop(trainer)
    except Diverged as error:
        finish_saves(trainer)  # an earlier, finite step's save in flight is kept
        if is_rank0():
            print(f"error: {error}", file=sys.stderr, flush=True)
        trainer.log.close()
        sys.exit(DIVERGED_EXIT_CODE)
    except CheckpointWriteFailed as error:
        if is_rank0():
            print(f"error: {error}", file=sys.stderr, flush=True)
        trainer.log.close()
        sys.exit(CHECKPOINT_FAILED_EXIT_CODE)
    except Stopped as stop:
        trainer.log.info(str(stop))
        trainer.log.close()
        _exit_stopped(str(stop))
    _validate(trainer, "test", cfg.trainer.limit_test_batches)
    trainer.log.close()
