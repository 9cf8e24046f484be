"""How long a checkpoint save stops training: synchronous vs asynchronous saves, one machine.

    python bench/checkpoint_save.py                      # a ~50M-parameter danube_tiny
    python bench/checkpoint_save.py --saves 4 model.num_layers=12   # Hydra-style overrides

Runs launchers/pretrain.py twice on the same model and data, saving every 2 steps, with
`exp_manager.checkpoint_callback_params.async_save` false then true, and reads the pause each
save put into training from the run's log ("training paused X s": for a synchronous save the
whole write, for an asynchronous one staging the tensors and forking the writer). Also the
run's wall time and the training steps' mean time (a background writer shares the CPU or the
host memory bandwidth with training: that cost shows there, not in the pause). The ratio is
the anchor: pause(async) / pause(sync) from the same run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.num_layers=8", "model.hidden_size=768", "model.ffn_hidden_size=2048",
         "model.num_attention_heads=12", "model.num_query_groups=4",
         "model.encoder_seq_length=128", "model.max_position_embeddings=128",
         "model.window_size=128", "model.micro_batch_size=2", "model.global_batch_size=2"]
PAUSE = re.compile(r"training paused ([0-9.]+) s")


def run(async_save: bool, saves: int, extra: list, folder: Path) -> dict:
    steps = 2 * saves
    args = [*MODEL, f"trainer.max_steps={steps}", "trainer.precision=32",
            "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0",
            "trainer.limit_test_batches=0", "exp_manager.create_tensorboard_logger=false",
            "model.optim.sched.warmup_steps=1",
            "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
            f"exp_manager.checkpoint_callback_params.save_top_k={saves}",
            f"exp_manager.checkpoint_callback_params.async_save={str(async_save).lower()}",
            f"exp_manager.exp_dir={folder}",
            f"exp_manager.name={'async' if async_save else 'sync'}",
            *extra]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "launchers" / "pretrain.py"), *args],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"run failed:\n{done.stderr[-3000:]}")
    pauses = [float(m.group(1)) for m in PAUSE.finditer(done.stdout)]
    records = [json.loads(line) for line in
               (folder / ("async" if async_save else "sync") / "metrics.jsonl").read_text()
               .splitlines()]
    step_times = [r["step_time_s"] for r in records if "step_time_s" in r]
    params = re.search(r"([0-9.]+)M parameters", done.stdout)
    ckpt = max((folder / ("async" if async_save else "sync") / "checkpoints").iterdir())
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    return {"mode": "async" if async_save else "sync", "saves": len(pauses),
            "pause_s": statistics.mean(pauses) if pauses else float("nan"),
            "step_s": statistics.mean(step_times) if step_times else float("nan"),
            "wall_s": wall, "params_m": float(params.group(1)) if params else None,
            "checkpoint_mb": size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    opts = parser.parse_args()
    import torch

    print(f"# CPU: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(mode, opts.saves, opts.overrides, Path(tmp)) for mode in (False, True)]
    sync = rows[0]["pause_s"]
    print(f"# model {rows[0]['params_m']}M parameters, checkpoint {rows[0]['checkpoint_mb']:.0f} MB"
          " (weights + Adam, fp32)")
    print(f"{'mode':<6} {'saves':>5} {'pause/save s':>13} {'ratio':>6} {'step s':>7} "
          f"{'run s':>6}")
    for r in rows:
        print(f"{r['mode']:<6} {r['saves']:>5} {r['pause_s']:>13.3f} {r['pause_s'] / sync:>6.2f} "
              f"{r['step_s']:>7.3f} {r['wall_s']:>6.1f}")


if __name__ == "__main__":
    main()
