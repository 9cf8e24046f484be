"""Run logging on rank 0: console progress, TensorBoard, and a JSONL metrics file.

metrics.jsonl holds one object per logged step ({"step", "loss", "lr", "grad_norm",
"tokens_per_s", ...}), one per validation ({"step", "val_loss", "val_ppl"}) and one per
downstream evaluation ({"step", "downstream/arc_easy/acc_norm", ...}); a resumed run appends
to it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence


class MetricsLogger:
    def __init__(self, exp_dir: Path, tensorboard: bool, max_steps: int, enabled: bool):
        self.enabled = enabled
        self.max_steps = max_steps
        self.jsonl = None
        self.tb = None
        self._start: Optional[float] = None
        self._start_step = 0
        if not enabled:
            return
        exp_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(exp_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(exp_dir / "tensorboard"))

    def start(self, step: int) -> None:
        self._start, self._start_step = time.perf_counter(), step

    def _eta(self, step: int) -> str:
        done = step - self._start_step
        if self._start is None or done <= 0:
            return "?"
        remaining = (time.perf_counter() - self._start) / done * (self.max_steps - step)
        return time.strftime("%H:%M:%S", time.gmtime(remaining))

    def _write(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def log_train(self, step: int, metrics: Dict[str, float], lr: float,
                  grad_norm: Optional[float], tokens_per_s: float, step_time: float,
                  consumed_samples: int, trained_tokens: Optional[int] = None,
                  console: Sequence[str] = ()) -> None:
        """`metrics` holds "loss" and whatever else the recipe reports (DPO: acc, rewards...);
        tokens_per_s counts trained tokens when the recipe masks some (SFT)."""
        if not self.enabled:
            return
        record = {"step": step, **metrics, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_s, "step_time_s": step_time,
                  "consumed_samples": consumed_samples}
        if trained_tokens is not None:
            record["trained_tokens"] = trained_tokens
        self._write(record)
        norm = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
        extra = "".join(f" | {name} {metrics[name]:.4g}" for name in console)
        print(f"step {step}/{self.max_steps} | loss {metrics['loss']:.4f}{extra} | lr {lr:.3e} | "
              f"grad_norm {norm} | {tokens_per_s:,.0f} tok/s | ETA {self._eta(step)}",
              flush=True)

    def log_validation(self, step: int, metrics: Dict[str, float], split: str = "val",
                       perplexity: bool = True) -> None:
        if not self.enabled:
            return
        record = {f"{split}_{name}": value for name, value in metrics.items()}
        if perplexity:
            record[f"{split}_ppl"] = math.exp(min(metrics["loss"], 50.0))
        self._write({"step": step, **record})
        print(f"step {step} | " + " | ".join(f"{k} {v:.4g}" for k, v in record.items()),
              flush=True)

    def log_downstream(self, step: int, scores: Dict[str, float]) -> None:
        """Benchmark scores ({"arc_easy/acc_norm": ...}) as "downstream/<task>/<metric>"."""
        if not self.enabled:
            return
        record = {f"downstream/{name}": value for name, value in scores.items()}
        self._write({"step": step, **record})
        print(f"step {step} | " + " | ".join(f"{k} {v:.4g}" for k, v in scores.items()),
              flush=True)

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_records(run: Path) -> List[dict]:
    """A run's metrics.jsonl as a list of records ([] when it has none yet)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(run_dirs) -> str:
    """A table of finished stages from their metrics.jsonl: steps, first and last training
    loss, first and last validation loss and reward accuracy (DPO), newest checkpoint. The
    first validation is step 0's with trainer.run_init_validation."""
    from danube.paths import latest_checkpoint

    rows = [("stage", "steps", "first loss", "last loss", "val_loss", "val_acc",
             "checkpoint")]
    for run in map(Path, run_dirs):
        records = read_records(run)
        train = {r["step"]: r["loss"] for r in records if "loss" in r}
        val = [r["val_loss"] for r in records if "val_loss" in r]
        acc = [r["val_acc"] for r in records if "val_acc" in r]
        newest = latest_checkpoint(run / "checkpoints")
        rows.append((run.name, str(max(train, default=0)),
                     f"{train[min(train)]:.3f}" if train else "-",
                     f"{train[max(train)]:.3f}" if train else "-",
                     f"{val[0]:.3f} -> {val[-1]:.3f}" if val else "-",
                     f"{acc[0]:.2f} -> {acc[-1]:.2f}" if acc else "-",
                     str(newest) if newest else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)
