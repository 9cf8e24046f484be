"""Direct preference optimization: the DPO recipe for the one loop (its data, its loss, its
reference policy), the reference log-prob cache, and the dry run.

Per pair, with log pi(y) the policy's summed log-probs over the response tokens (their mean
with preference_average_log_probs) and pi_ref the reference's:
    u_c = log pi(y_c) - log pi_ref(y_c),  u_r likewise,  d = u_c - u_r
    loss = preference_loss_weight * L_pref(d) + sft_loss_weight * (-log pi(y_c))
averaged over the valid pairs of the whole global batch (megatron-core's per-token protocol
with the count = pairs), so micro-batch size, accumulation, data parallelism and packing do
not change it. Rewards are beta * u (the DPO paper's implicit reward, as TRL logs it;
NeMo-Aligner logs u without beta although its docs say otherwise).

The reference policy runs through the same schedule, micro-batches and precision as the
policy: LoRA, the model with its adapters disabled; full fine-tuning, the starting weights,
kept on the CPU and swapped in for the reference pass (NeMo-Aligner's cpu_weight_swap). At the
first step of a run the policy is the reference, so their log-probs must agree bit for bit;
the run stops with an error otherwise (dropout, a non-zero LoRA B, another checkpoint...).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F

from danube.config.derived import PREFERENCE_LOSSES
from danube.config.schema import DPOConfig
from danube.data.chat import ChatDataError
from danube.data.dpo import DPODataset, DPOStep, build_dpo_dataset, dpo_step_batches
from danube.data.embedded_chat import resolve_chat_files
from danube.data.sft import epoch_order, global_batch_indices
from danube.data.tokenizer import Tokenizer, load_tokenizer
from danube.runtime import PrecisionChoice
from danube.training.data_plan import chat_data_plan

SPLITS = {"val": "validation", "test": "test"}  # the loop's names -> data_prefix's
# Reported per pair (or per sequence: rewards_all_*, ref_logps_abs_diff) as [sum, count].
METRICS = ("loss", "preference_loss", "sft_loss", "acc", "rewards_chosen_mean",
           "rewards_rejected_mean", "rewards_all_mean", "rewards_all_sq", "rewards_margins",
           "logps_chosen", "logps_rejected", "ref_logps_abs_diff")
# Mean |log pi - log pi_ref| per sequence allowed at the first step when the reference comes
# from a cache made with another parallel layout (same layout: exactly 0).
LAYOUT_TOLERANCE = {"32": 1e-2, "bf16": 1.0}
CACHE_VERSION = 2  # 2: the key covers which pairs are masked (seq_length)


def first_step_tolerance(exact: bool, precision: str, cuda: bool) -> float:
    """How far step 1's policy log-probs may be from the reference's (per sequence). 0 where
    the same kernels compute both from the same micro-batches (CPU: the train-mode pass with
    autograd and the eval-mode pass under no_grad give the same bits). On a GPU the two passes
    may take different kernels (an attention backward-capable kernel for the policy,
    another under no_grad; TE's FP8 amax updates in training), so the same tolerance as a
    cache from another layout applies: a wrong reference is off by far more (nats), not by
    rounding."""
    if exact and not cuda:
        return 0.0
    return LAYOUT_TOLERANCE["32" if precision in ("32", "32-true") else "bf16"]


class ReferenceMismatch(RuntimeError):
    """Policy and reference disagree where they must be the same model."""


LAUNCH_ERRORS = (ReferenceMismatch,)  # ended with a message by the launcher

def preference_loss(kind: str, d: torch.Tensor, beta: float, reward_gap: torch.Tensor,
                    eta: float, label_smoothing: float) -> torch.Tensor:
    """Per-pair preference loss of d = u_c - u_r (see model.dpo in the schema)."""
    x = beta * d
    if kind == "dpo":  # with label_smoothing: conservative DPO (cDPO, as TRL defines it)
        eps = label_smoothing
        return -F.logsigmoid(x) if eps == 0 else \
            -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)
    if kind == "ipo":
        return (d - 1.0 / (2.0 * beta)) ** 2
    if kind == "rpo_sq":
        return (x - eta * reward_gap) ** 2
    if kind in ("rpo_bwd_kl", "rpo_fwd_kl"):
        log_p, log_1mp = F.logsigmoid(x), F.logsigmoid(-x)
        g = (eta * reward_gap).to(x.dtype)
        log_q, log_1mq = F.logsigmoid(g), F.logsigmoid(-g)
        if kind == "rpo_bwd_kl":  # KL(q || p)
            return log_q.exp() * (log_q - log_p) + log_1mq.exp() * (log_1mq - log_1mp)
        return log_p.exp() * (log_p - log_q) + log_1mp.exp() * (log_1mp - log_1mq)
    if kind == "hinge":
        return torch.relu(1.0 - x)
    if kind == "robust":
        eps = label_smoothing
        return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)
    raise ValueError(f"unknown preference loss {kind!r}; one of {PREFERENCE_LOSSES}")


def sequence_logps(output: torch.Tensor, batch: dict):
    """(summed log-probs [n], response tokens [n], per-token log-probs [n, L]) of the
    micro-batch's sequences from the model's per-token losses [b, s]. A dense gather and a
    row sum: deterministic on every device."""
    tokens = -output.float().reshape(-1)[batch["seq_gather"]] * batch["seq_mask"]
    return tokens.sum(1), batch["seq_mask"].sum(1), tokens


def _pair_report(values: torch.Tensor, count: int) -> torch.Tensor:
    """[sum, count] on the values' device (the reduction moves it once per step, not per
    metric and micro-batch)."""
    return torch.stack([values.detach().double().sum(),
                        torch.tensor(float(count), dtype=torch.float64, device=values.device)])


def dpo_loss(d_cfg, raw: dict, batch: dict, output: torch.Tensor):
    """One micro-batch's summed pair losses, its pair count and its report."""
    sums, counts, _ = sequence_logps(output, batch)
    ref = batch["ref_logps"].to(sums.dtype)
    pairs = sums.numel() // 2
    avg = d_cfg.preference_average_log_probs
    scale = counts.clamp(min=1) if avg else torch.ones_like(counts)
    u = (sums - ref) / scale
    u_c, u_r = u[0::2], u[1::2]
    d = u_c - u_r
    gap = batch["rewards"][:, 0] - batch["rewards"][:, 1]
    beta = d_cfg.ref_policy_kl_penalty
    pref = preference_loss(d_cfg.preference_loss, d, beta, gap, d_cfg.gt_reward_scale,
                           d_cfg.label_smoothing)
    chosen = sums[0::2] / (counts[0::2].clamp(min=1) if d_cfg.sft_average_log_probs else 1.0)
    sft = -chosen
    per_pair = d_cfg.preference_loss_weight * pref + d_cfg.sft_loss_weight * sft
    loss = per_pair.sum() if pairs else output.sum() * 0.0  # keeps the graph when empty
    rewards = beta * u.detach()
    report = {
        "loss": _pair_report(per_pair, pairs),
        "preference_loss": _pair_report(pref, pairs),
        "sft_loss": _pair_report(sft, pairs),
        "acc": _pair_report((u_c > u_r).float(), pairs),
        "rewards_chosen_mean": _pair_report(rewards[0::2], pairs),
        "rewards_rejected_mean": _pair_report(rewards[1::2], pairs),
        "rewards_all_mean": _pair_report(rewards, 2 * pairs),
        "rewards_all_sq": _pair_report(rewards ** 2, 2 * pairs),
        "rewards_margins": _pair_report(beta * d.detach(), pairs),
        "logps_chosen": _pair_report(sums[0::2], pairs),
        "logps_rejected": _pair_report(sums[1::2], pairs),
        "ref_logps_abs_diff": _pair_report((sums.detach() - ref).abs(), 2 * pairs),
    }
    return loss, torch.tensor(pairs, dtype=torch.int, device=output.device), report


def dpo_metrics(means: Dict[str, float]) -> Dict[str, float]:
    metrics = {k: v for k, v in means.items() if k != "rewards_all_sq"}
    variance = means["rewards_all_sq"] - means["rewards_all_mean"] ** 2
    metrics["rewards_all_std"] = float("nan") if math.isnan(variance) \
        else math.sqrt(max(variance, 0.0))
    return metrics


def _collect(keep_tokens: bool, raw: dict, batch: dict, output: torch.Tensor):
    """Reference pass: keep each sequence's summed log-probs (and per-token values) in the
    micro-batch the recipe made."""
    sums, _, tokens = sequence_logps(output, batch)
    raw["ref_logps"] = sums.detach().cpu()
    if keep_tokens:
        raw["ref_token_logps"] = tokens.detach().cpu()
    return output.sum() * 0.0, torch.zeros((), dtype=torch.int, device=output.device), {}


class Reference:
    """The reference policy inside the policy's own model: adapters disabled (LoRA), or the
    starting weights swapped in from a CPU copy (full fine-tuning; `snapshot` at the start)."""

    def __init__(self, model: List, device: torch.device, lora: bool, snapshot: bool):
        self.model, self.device, self.lora = model, device, lora
        self.weights = [p.detach().to("cpu", copy=True) for p in self._params()] \
            if snapshot and not lora else None

    def _params(self):
        return [p for chunk in self.model for p in chunk.parameters()]

    @contextmanager
    def active(self) -> Iterator[None]:
        from danube.model.lora import adapters_disabled

        if self.lora:
            with adapters_disabled(self.model):
                yield
            return
        if self.weights is None:  # the model holds the starting weights (precompute)
            yield
            return
        from danube.training.engine import params_synced

        params = self._params()
        with params_synced(self.model):  # no overlapped gather may land on swapped weights
            current = [p.detach().to("cpu", copy=True) for p in params]
            with torch.no_grad():
                for p, w in zip(params, self.weights):
                    p.copy_(w)
            try:
                yield
            finally:
                with torch.no_grad():
                    for p, w in zip(params, current):
                        p.copy_(w)

    def annotate(self, batches: List[List[dict]], keep_tokens: bool = False) -> None:
        """Reference log-probs into every micro-batch of `batches` (`ref_logps`), through
        the same schedule as the policy's forward (collective)."""
        from danube.training.step import forward_only

        with self.active():
            forward_only(self.model, batches, self.device, partial(_collect, keep_tokens))


# --- the reference cache (ref_log_probs: precompute) ------------------------------------------

def cache_dir(cfg: DPOConfig) -> Path:
    from danube.data.embedded import default_cache_dir

    given = cfg.model.dpo.ref_log_probs_cache_dir
    return Path(given) if given else default_cache_dir() / "ref_log_probs"


def checkpoint_identity(path: Path) -> str:
    """The reference checkpoint: its resolved path and every file's name, size and mtime."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
               for p in files]
    return json.dumps([str(path.resolve()), listing])


def cache_key(dataset: DPODataset, checkpoint: Path, precision: str) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{precision}|".encode())
    h.update(dataset.digest().encode())
    h.update(checkpoint_identity(checkpoint).encode())
    return h.hexdigest()[:32]


def layout_of(cfg: DPOConfig) -> dict:
    """What makes step 0's micro-batches (and so the reference's exact values) what they
    are."""
    from megatron.core import parallel_state

    from danube.model.builder import uses_transformer_engine

    m = cfg.model
    return {"tp": m.tensor_model_parallel_size, "pp": m.pipeline_model_parallel_size,
            "vp": m.virtual_pipeline_model_parallel_size,
            "dp": parallel_state.get_data_parallel_world_size(),
            "micro_batch_size": m.micro_batch_size, "global_batch_size": m.global_batch_size,
            "packed": m.data.packed_sequence, "seq_length": m.data.seq_length,
            "seed": m.seed, "shuffle": m.data.shuffle,
            "transformer_engine": uses_transformer_engine(m)}


@dataclass
class ReferenceCache:
    chosen: torch.Tensor
    """[pairs] summed reference log-probs of each chosen response (NaN: masked pair)."""
    rejected: torch.Tensor
    path: Path
    layout: dict
    computed_now: bool

    def fill(self, micro_batches: List[dict]) -> None:
        for batch in micro_batches:
            index = batch["pair_index"]
            batch["ref_logps"] = torch.stack([self.chosen[index], self.rejected[index]],
                                             1).reshape(-1)


def _precompute(reference: Reference, dataset: DPODataset, batching: dict,
                global_batch_size: int, seed: int, shuffle: bool) -> dict:
    """One reference pass over every pair, global batches in the first epoch's order (the
    same micro-batches as the training steps of that epoch); every rank gets all values."""
    from megatron.core import parallel_state

    order = epoch_order(len(dataset.pairs), 0, seed, shuffle)
    mine: Dict[int, tuple] = {}
    emits = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
             and parallel_state.get_tensor_model_parallel_rank() == 0)
    for start in range(0, len(order), global_batch_size):
        step = dpo_step_batches(dataset, order[start:start + global_batch_size], **batching)
        reference.annotate([step.micro_batches], keep_tokens=True)
        if not emits:
            continue
        for batch in step.micro_batches:
            mask = batch["seq_mask"] > 0
            for k, index in enumerate(batch["pair_index"].tolist()):
                c, r = 2 * k, 2 * k + 1
                mine[index] = (float(batch["ref_logps"][c]), float(batch["ref_logps"][r]),
                               batch["ref_token_logps"][c][mask[c]].clone(),
                               batch["ref_token_logps"][r][mask[r]].clone())
    gathered: List[Optional[dict]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    merged: Dict[int, tuple] = {}
    for part in gathered:
        merged.update(part)
    return merged


def reference_cache(cfg: DPOConfig, reference: Reference, dataset: DPODataset, split: str,
                    batching: dict, log) -> ReferenceCache:
    """The split's precomputed reference log-probs: read from the cache, or computed now and
    written there (rank 0, atomically). Collective."""
    from danube.training.loop import barrier, is_rank0

    m = cfg.model
    start = Path(m.restore_from_path)
    key = cache_key(dataset, start, str(cfg.trainer.precision))
    path = cache_dir(cfg) / f"{key}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        valid = torch.tensor([not p.masked for p in dataset.pairs])
        usable = len(saved["chosen"]) == len(dataset.pairs) and bool(
            torch.isfinite(saved["chosen"][valid]).all()
            and torch.isfinite(saved["rejected"][valid]).all())
        if usable:
            log.info(f"reference log-probs ({split}): reusing {path} (computed with layout "
                     f"{saved['layout']})")
            return ReferenceCache(saved["chosen"], saved["rejected"], path, saved["layout"],
                                  False)
        log.info(f"reference log-probs ({split}): {path} lacks values for pairs valid now "
                 "(written for other data); computing them again")
    log.info(f"reference log-probs ({split}): one pass over {len(dataset.pairs)} pairs -> "
             f"{path}")
    values = _precompute(reference, dataset, batching, m.global_batch_size, m.seed,
                         m.data.shuffle and split == "train")
    n = len(dataset.pairs)
    chosen = torch.full((n,), float("nan"))
    rejected = torch.full((n,), float("nan"))
    for index, (c, r, _, _) in values.items():
        chosen[index], rejected[index] = c, r
    layout = layout_of(cfg)
    if is_rank0():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"version": CACHE_VERSION, "layout": layout, "split": split,
                    "checkpoint": str(start), "pairs": n, "chosen": chosen,
                    "rejected": rejected,
                    "chosen_tokens": [values[i][2] if i in values else None for i in range(n)],
                    "rejected_tokens": [values[i][3] if i in values else None
                                        for i in range(n)]}, tmp)
        os.replace(tmp, path)
    barrier()
    return ReferenceCache(chosen, rejected, path, layout, True)


# --- the recipe -----------------------------------------------------------------------------

def _datasets(cfg: DPOConfig, tokenizer: Tokenizer) -> Dict[str, Optional[DPODataset]]:
    """train / validation / test pairs, tokenized; bad records raise ChatDataError (file and
    line) before any model is built."""
    data = cfg.model.data
    cache = data.embedded_cache_dir and Path(data.embedded_cache_dir)
    sets: Dict[str, Optional[DPODataset]] = {}
    for split in ("train", "validation", "test"):
        files = (data.data_prefix or {}).get(split)
        sets[split] = None if not files else build_dpo_dataset(
            resolve_chat_files(files, cache), data, tokenizer)
    train = sets["train"]
    if train.valid < cfg.model.global_batch_size:
        raise ChatDataError(
            f"model.data.data_prefix.train has {train.valid} usable pair(s) ({train.stats}), "
            f"fewer than one global batch ({cfg.model.global_batch_size}): add data, raise "
            "model.data.seq_length or lower model.global_batch_size")
    return sets


def _batching(cfg: DPOConfig, tokenizer: Tokenizer, dp_rank: int, dp_size: int) -> dict:
    m = cfg.model
    return dict(seq_length=m.data.seq_length, packed=m.data.packed_sequence,
                micro_batch_size=m.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                pad_id=max(tokenizer.pad, 0))


def dpo_recipe(cfg: DPOConfig, datasets: Dict[str, Optional[DPODataset]], batching: dict,
               reference: Reference, caches: Dict[str, ReferenceCache]):
    """The DPO recipe: per step, the global batch's pairs with their reference log-probs
    (cached, or computed now); the loss per pair over the global batch; the step-0 check."""
    from danube.training.loop import Recipe, StepData

    m, d_cfg = cfg.model, cfg.model.dpo
    gbs = m.global_batch_size

    def annotate(step: DPOStep, split: str) -> StepData:
        if split in caches:
            caches[split].fill(step.micro_batches)
        else:
            reference.annotate([step.micro_batches])
        return StepData(step.micro_batches, step.pairs, step.tokens,
                        {"masked_pairs": step.masked})

    def steps(split: str, first: int, last: int) -> Iterator[StepData]:
        dataset = datasets[split]
        shuffle = m.data.shuffle and split == "train"
        for step in range(first, last):
            indices = global_batch_indices(len(dataset.pairs), gbs, step, m.seed, shuffle)
            yield annotate(dpo_step_batches(dataset, indices, **batching), split)

    def train_steps(first: int, last: int, consumed: int) -> Iterator[StepData]:
        return steps("train", first, last)

    def eval_steps(split: str, batches: int) -> Optional[List[StepData]]:
        name = SPLITS[split]
        if datasets.get(name) is None or len(datasets[name].pairs) < gbs:
            return None
        return list(steps(name, 0, min(batches, len(datasets[name].pairs) // gbs)))

    cache = caches.get("train")
    exact = cache is None or cache.computed_now or cache.layout == layout_of(cfg)
    from danube.runtime import use_cuda

    tolerance = first_step_tolerance(exact, str(cfg.trainer.precision),
                                     use_cuda(cfg.trainer.accelerator))

    def check_first_step(metrics: Dict[str, float]) -> None:
        """At the first step the policy is the reference: their log-probs must agree."""
        diff = metrics["ref_logps_abs_diff"]
        if not diff <= tolerance:
            source = f"the cache {cache.path} (made with layout {cache.layout})" if cache \
                else "the reference pass"
            raise ReferenceMismatch(
                f"at step 0 the policy's log-probs differ from the reference's (from {source})"
                f" by {diff:.3g} per sequence on average (allowed: {tolerance}); they are the "
                "same model there. Check that dropout is 0 (model.hidden_dropout, "
                "attention_dropout), that LoRA starts at zero (lora_tuning.row_init_method="
                "zero) and that the cache belongs to model.restore_from_path; or delete the "
                "cache to recompute it")

    files = resolve_chat_files(m.data.data_prefix["train"],
                               m.data.embedded_cache_dir and Path(m.data.embedded_cache_dir))
    plan = chat_data_plan(files, len(datasets["train"].pairs), gbs, m.seed, m.data.shuffle)
    return Recipe("dpo", train_steps, eval_steps, per_token_loss=True,
                  loss_fn=partial(dpo_loss, d_cfg), metric_names=METRICS, metrics=dpo_metrics,
                  console=("acc", "rewards_margins"), perplexity=False,
                  check_first_step=check_first_step,
                  data_plan=plan)


def run_dpo(cfg: DPOConfig, precision: PrecisionChoice, downstream=None) -> None:
    """The whole job (collective): data first (bad records stop it before anything is built or
    written), the starting checkpoint (= the reference), its log-probs when precomputed, then
    the shared loop (which resumes this experiment's newest checkpoint if there is one)."""
    from megatron.core import parallel_state

    from danube.training.distributed import init_distributed, shutdown
    from danube.training.loop import build_trainer, load_initial, run
    from danube.training.sft import with_epoch_steps

    tokenizer = load_tokenizer(cfg.model.tokenizer.model)
    datasets = _datasets(cfg, tokenizer)
    train = datasets["train"]
    cfg = with_epoch_steps(cfg, len(train.pairs), cfg.model.global_batch_size)
    init_distributed(cfg.model, cfg.trainer.accelerator)
    try:
        m = cfg.model
        trainer = build_trainer(cfg, tokenizer, tokenizer.vocab_size, per_token_loss=True)
        load_initial(trainer, Path(m.restore_from_path), "reference policy and starting weights")
        lora = m.peft.peft_scheme == "lora"
        precompute = m.dpo.ref_log_probs == "precompute"
        reference = Reference(trainer.model, trainer.device, lora, snapshot=not precompute)
        batching = _batching(cfg, tokenizer, parallel_state.get_data_parallel_rank(),
                             parallel_state.get_data_parallel_world_size())
        caches = {}
        if precompute:
            for split, dataset in datasets.items():
                if dataset is not None:
                    caches[split] = reference_cache(cfg, reference, dataset, split, batching,
                                                    trainer.log)
        recipe = dpo_recipe(cfg, datasets, batching, reference, caches)
        st = train.stats
        describe = (f"{len(train.pairs)} pairs ({st['masked_too_long']} masked: longer than "
                    f"{m.data.seq_length}), {m.global_batch_size} per step, "
                    f"{'packed' if m.data.packed_sequence else 'unpacked'}, loss "
                    f"{m.dpo.preference_loss} (beta {m.dpo.ref_policy_kl_penalty}), reference "
                    f"{'adapters disabled' if lora else 'starting weights'}, "
                    f"{m.dpo.ref_log_probs}")
        run(trainer, recipe, precision, None, describe, downstream)
    finally:
        shutdown()


def dry_run(cfg: DPOConfig, pairs: int) -> str:
    """What training would see, without a model: the first global batch's first pairs
    (prompt, each response's trained tokens, where joint tokenization would differ) and a
    summary."""
    tokenizer = load_tokenizer(cfg.model.tokenizer.model)
    train = _datasets(cfg, tokenizer)["train"]
    m = cfg.model
    indices = global_batch_indices(len(train.pairs), m.global_batch_size, 0, m.seed,
                                   m.data.shuffle)
    lines = []
    for index in indices[:pairs]:
        pair = train.pairs[index]
        prompt = tokenizer.hf.decode(pair.chosen.ids[:pair.prompt_tokens].tolist(),
                                     skip_special_tokens=False)
        lines.append(f"pair {index} ({pair.where}){' MASKED: too long' if pair.masked else ''}")
        if pair.joint_differs is not None:
            at = pair.joint_differs
            lines.append(f"  joint tokenization of prompt + response would differ from token "
                         f"{at} ({tokenizer.hf.id_to_token(int(pair.chosen.ids[at]))!r} here, "
                         "segment by segment)")
        lines.append(f"  prompt   {pair.prompt_tokens:4d} tokens (not trained): {prompt!r}")
        for name, sample in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            ids = sample.ids[sample.trained].tolist()
            pieces = [tokenizer.hf.id_to_token(i) for i in ids]
            lines.append(f"  {name:8s} {len(ids):4d} tokens (trained, last {pieces[-1]!r}): "
                         f"{tokenizer.hf.decode(ids, skip_special_tokens=False)!r}")
    st = train.stats
    lines += ["", "summary (train):",
              f"  pairs                          {len(train.pairs)} of {st['records']} records",
              f"  masked (longer than {m.data.seq_length:5d})    {st['masked_too_long']}",
              f"  joint tokenization differs     {st['joint_tokenization_differs']} (trained "
              "segment by segment: the prompt's ids are the same in both sequences)",
              f"  skipped bad records            {st['skipped_bad_records']}",
              f"  rows: {'packed, 2 x seq_length' if m.data.packed_sequence else 'unpacked'}"]
    return "\n".join(lines)
