"""Pictures of runs: curves from metrics.jsonl and a table comparing runs and checkpoints.

One PNG per quantity, every run on the same axes (so a pretraining run and its fine-tuning
stages, or two recipes, sit side by side): training and validation loss, learning rate, grad
norm, tokens/s, and every downstream score (model.downstream_eval). The table puts each run's
last losses beside the benchmark results saved by eval/evaluate.py under its checkpoints
(<checkpoint>/eval/results_*.json, the newest per checkpoint), as PNG and Markdown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

CURVES = [  # file, title, [(metrics.jsonl key, label)], log-scale y
    ("loss.png", "loss", [("loss", "train"), ("val_loss", "validation")], False),
    ("lr.png", "learning rate", [("lr", "lr")], False),
    ("grad_norm.png", "gradient norm", [("grad_norm", "grad norm")], True),
    ("tokens_per_s.png", "throughput (tokens/s)", [("tokens_per_s", "tokens/s")], False),
]


class PlotError(ValueError):
    pass


def read_records(run: Path) -> List[dict]:
    from danube.training.metrics import read_records as records_of

    if not (run / "metrics.jsonl").is_file():
        raise PlotError(f"{run} has no metrics.jsonl: give run directories (results/<name>)")
    return records_of(run)


def _series(records: List[dict], key: str):
    """(steps, values) of the last record per step having `key` (a resumed run re-logs)."""
    by_step = {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def checkpoint_results(run: Path) -> Dict[str, Dict[str, float]]:
    """{checkpoint name: {task/metric: value}} from the newest results JSON of each."""
    from danube.evaluation.run import headline

    out = {}
    for ckpt in sorted((run / "checkpoints").glob("step_*")):
        files = list((ckpt / "eval").glob("*.json"))  # per-sample logs are .jsonl
        if files:
            newest = max(files, key=lambda f: f.stat().st_mtime)
            out[f"{run.name}/{ckpt.name}"] = headline(json.loads(newest.read_text()))
    return out


def comparison_rows(runs: Sequence[Path]) -> List[List[str]]:
    """Header + one row per run (last train/val loss) and per evaluated checkpoint."""
    rows: List[Dict[str, str]] = []
    for run in runs:
        records = read_records(run)
        _, train = _series(records, "loss")
        _, val = _series(records, "val_loss")
        row = {"run / checkpoint": run.name, "last loss": f"{train[-1]:.3f}" if train else "-",
               "last val_loss": f"{val[-1]:.3f}" if val else "-"}
        down = [k for k in {k for r in records for k in r} if k.startswith("downstream/")]
        for key in sorted(down):
            _, values = _series(records, key)
            row[key.removeprefix("downstream/") + " (in loop)"] = f"{values[-1]:.3f}"
        rows.append(row)
        for name, scores in checkpoint_results(run).items():
            rows.append({"run / checkpoint": name,
                         **{k: f"{v:.3f}" for k, v in sorted(scores.items())}})
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return [columns] + [[row.get(c, "") for c in columns] for row in rows]


def markdown(rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]]) + "\n"


def render(runs: Sequence[Path], out_dir: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Path(r) for r in runs]
    records = {run: read_records(run) for run in runs}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def figure(name: str, title: str, lines, log: bool) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        drawn = 0
        for label, steps, values, style in lines:
            if steps:
                ax.plot(steps, values, style, label=label, markersize=4)
                drawn += 1
        if not drawn:
            plt.close(fig)
            return
        ax.set_title(title)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)

    for name, title, keys, log in CURVES:
        lines = []
        for run in runs:
            for key, label in keys:
                steps, values = _series(records[run], key)
                style = "o--" if key.startswith("val_") else "-"
                lines.append((f"{run.name} {label}" if len(keys) > 1 or len(runs) > 1
                              else label, steps, values, style))
        figure(name, title, lines, log)
    down = sorted({k for rs in records.values() for r in rs for k in r
                   if k.startswith("downstream/")})
    figure("downstream.png", "downstream scores (model.downstream_eval)",
           [(f"{run.name} {key.removeprefix('downstream/')}", *_series(records[run], key), "o-")
            for run in runs for key in down], False)

    rows = comparison_rows(runs)
    (out_dir / "comparison.md").write_text(markdown(rows))
    written.append(out_dir / "comparison.md")
    fig, ax = plt.subplots(figsize=(min(2 + 1.6 * len(rows[0]), 22), 0.6 + 0.4 * len(rows)),
                           dpi=110)
    ax.axis("off")
    table = ax.table(cellText=rows[1:], colLabels=rows[0], loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width(list(range(len(rows[0]))))
    fig.tight_layout()
    fig.savefig(out_dir / "comparison.png", bbox_inches="tight")
    plt.close(fig)
    written.append(out_dir / "comparison.png")
    return written
