"""`eval/evaluate.py`: lm-evaluation-harness on a danube checkpoint (natively) or a Hugging Face
directory (lm-eval's HF backend), offline, with the BOS policy and everything else that moves
a score written beside the numbers."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

from danube.paths import CONFIG_FILE
from danube.task_names import EVAL_TASKS_DIR, offline_task_names  # noqa: F401 (re-exported)

SUITES = {
    "danube_base": "the H2O-Danube report's base-model suite: ARC-e, ARC-c, BoolQ, HellaSwag, "
                   "OpenBookQA, PIQA, WinoGrande (0-shot)",
    "mmlu": "MMLU, 57 subjects (5-shot in the report's leaderboard table)",
    "lambada_openai": "LAMBADA (OpenAI's version): last-word accuracy and perplexity",
}
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class EvaluationError(ValueError):
    pass


@dataclass
class EvalSettings:
    tasks: List[str]
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 8
    add_bos: bool = False
    precision: str = "auto"
    log_samples: bool = False
    seed: int = 1234


def is_hf_directory(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / CONFIG_FILE).is_file() and any(
        path.glob("*.safetensors")) | any(path.glob("*.bin"))


def task_manager(names: List[str]):
    """Our offline tasks; lm-eval's own registry too when a name is not ours (those read
    their data from the Hugging Face hub)."""
    from lm_eval.tasks import TaskManager

    ours = TaskManager(include_path=str(EVAL_TASKS_DIR), include_defaults=False)
    if all(name in ours.all_tasks for name in names):
        return ours
    everything = TaskManager(include_path=str(EVAL_TASKS_DIR), include_defaults=True)
    unknown = [n for n in names if n not in everything.all_tasks]
    if unknown:
        raise EvaluationError(
            f"unknown task(s) {unknown}: the offline ones are {sorted(SUITES)} and the tasks "
            f"under {EVAL_TASKS_DIR} (`eval/evaluate.py --list`); lm-eval's own task names "
            "work too where the Hugging Face hub is reachable")
    return everything


def _hf_lm(path: Path, settings: EvalSettings):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from danube.runtime import use_cuda

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if settings.add_bos and tokenizer("a")["input_ids"][:1] != [tokenizer.bos_token_id]:
        raise EvaluationError(
            f"--add-bos, but the tokenizer in {path} does not add BOS when asked to: the HF "
            "path would score without it. Evaluate without --add-bos, or fix the tokenizer's "
            "post-processor")
    prefix = tokenizer.bos_token_id if settings.add_bos else tokenizer.eos_token_id
    dtype = "float32" if settings.precision in ("auto", "32") else "bfloat16"
    # logits_cache=False: with it, lm-eval 0.4.13 scored a rolling document 3.6 nats off when
    # windows of several documents shared a batch (tests/test_evaluation.py catches it).
    return HFLM(pretrained=str(path), dtype=dtype, device="cuda" if use_cuda("auto") else "cpu",
                batch_size=settings.batch_size, add_bos_token=settings.add_bos,
                prefix_token_id=prefix, logits_cache=False)


class _Notices(logging.Filter):
    """lm-eval's per-task notices that say nothing about our tasks."""

    NOISE = ("Custom kwargs can be passed", "is defined, but aggregation is not",
             "is defined, but higher_is_better is not")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.NOISE)


def score(lm, settings: EvalSettings, manager=None) -> dict:
    """lm-eval's simple_evaluate on an LM instance, offline."""
    import datasets
    from lm_eval import simple_evaluate

    os.environ.update(OFFLINE)
    datasets.disable_progress_bars()
    for name in ("lm_eval.api.task", "lm-eval", "lm_eval"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Notices) for f in logger.filters):
            logger.addFilter(_Notices())
    manager = manager or task_manager(settings.tasks)
    return simple_evaluate(
        model=lm, tasks=settings.tasks, num_fewshot=settings.num_fewshot,
        limit=settings.limit, task_manager=manager, log_samples=settings.log_samples,
        bootstrap_iters=1000, random_seed=settings.seed, numpy_random_seed=settings.seed,
        torch_random_seed=settings.seed, fewshot_random_seed=settings.seed)


def headline(results: dict) -> Dict[str, float]:
    """{task/metric: value} for every task's acc, acc_norm, perplexity (stderr left out)."""
    out = {}
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            name = key.split(",")[0]
            if name in ("acc", "acc_norm", "perplexity", "word_perplexity") and \
                    isinstance(value, (int, float)):
                out[f"{task}/{name}"] = float(value)
    return out


def evaluate(target: Path, settings: EvalSettings, output: Optional[Path] = None) -> dict:
    """Score `target` (a danube checkpoint or run directory, or an HF directory); print the
    table, write the JSON (default: <target>/eval/results_<time>.json)."""
    import lm_eval
    from lm_eval.utils import make_table

    from danube.evaluation.lm import DanubeLM
    from danube.inference.model import open_checkpoint, resolve_checkpoint

    target = Path(target)
    if not target.exists():
        raise EvaluationError(f"{target} does not exist: give a danube checkpoint, a run "
                              "directory (results/<name>) or a Hugging Face directory")
    manager = task_manager(settings.tasks)  # unknown names fail before a model loads
    started = time.time()
    if is_hf_directory(target):
        kind, where = "hf", target
        results = score(_hf_lm(target, settings), settings, manager)
        precision = "32" if settings.precision in ("auto", "32") else "bf16"
        window = json.loads((target / "config.json").read_text()).get("sliding_window")
    else:
        kind, where = "danube", resolve_checkpoint(target)
        with open_checkpoint(where, settings.precision) as im:
            results = score(DanubeLM(im, settings.batch_size, settings.add_bos), settings,
                            manager)
            precision, window = im.precision, im.config.window_size
    samples = results.pop("samples", None)
    results["danube"] = {
        "model": str(where), "backend": kind, "lm_eval": lm_eval.__version__,
        "bos": "BOS first, BOS is the prefix token" if settings.add_bos
        else "no BOS; EOS is the prefix token", "precision": precision, "window": window,
        "seconds": round(time.time() - started, 1), **asdict(settings)}
    print(make_table(results))
    if "groups" in results and results["groups"]:
        print(make_table(results, "groups"))
    output = Path(output) if output else where / "eval" / \
        f"results_{time.strftime('%Y%m%dT%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str))
    if samples is not None:
        for task, rows in samples.items():
            with open(output.with_name(f"{output.stem}_samples_{task}.jsonl"), "w") as f:
                for row in rows:
                    f.write(json.dumps(row, default=str) + "\n")
    print(f"results: {output}")
    return results
