"""Alternating rounds of bench worker processes, each mode's best round kept.

Each mode runs in its own process (so its peak memory is its own); the modes alternate for
`rounds` rounds so that a shared machine's load hits them alike; a worker prints one JSON
object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]


def best_of_rounds(script: str, modes: Sequence[str], rounds: int, worker_args: List[str],
                   key: str, scratch: str) -> Dict[str, dict]:
    """mode -> the result of its round with the highest `key`, in `modes` order. Workers run
    `script --worker MODE *worker_args` with BENCH_DIR=scratch; a failed one stops the bench."""
    best: Dict[str, dict] = {}
    for _ in range(rounds):
        for mode in modes:
            out = subprocess.run([sys.executable, script, "--worker", mode, *worker_args],
                                 capture_output=True, text=True, cwd=ROOT,
                                 env={**os.environ, "BENCH_DIR": scratch})
            if out.returncode != 0:
                sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if mode not in best or result[key] > best[mode][key]:
                best[mode] = result
    return best


def start_checkpoint(scratch: Path, overrides: Sequence[str] = ()) -> Path:
    """danube_tiny's step-0 weights (the fine-tuning benches measure speed, not quality)."""
    subprocess.run([sys.executable, str(ROOT / "launchers" / "pretrain.py"),
                    "trainer.max_steps=0", "model.optim.sched.max_steps=300",
                    "trainer.limit_val_batches=0", "trainer.limit_test_batches=0",
                    f"exp_manager.exp_dir={scratch}", "exp_manager.name=init", *overrides],
                   check=True, capture_output=True, cwd=ROOT)
    return scratch / "init"


def fine_tuning_bench(script: str, doc: str, modes: Sequence[str], default_steps: int,
                      stage: str, key: str, worker: Callable
                      ) -> Optional[Tuple[argparse.Namespace, Dict[str, dict], str]]:
    """The command line of bench/sft.py and bench/dpo.py: as a worker, run `worker(mode,
    overrides, steps, warmup)` and return None; else every mode's best round from a fresh
    danube_tiny init, with the line naming the config, the rounds and the CPU."""
    from danube.runtime import cpu_capability, cpu_native_bf16

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=default_steps, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=modes, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=f"{stage} config overrides, key=value")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.overrides, args.steps, args.warmup)
        return None
    with tempfile.TemporaryDirectory() as scratch:
        init = start_checkpoint(Path(scratch))
        best = best_of_rounds(script, modes, args.rounds,
                              ["--steps", str(args.steps), "--warmup", str(args.warmup),
                               f"model.restore_from_path={init}", *args.overrides],
                              key, scratch)
    title = (f"\ndanube_tiny_{stage.lower()} {' '.join(args.overrides)} | best of {args.rounds} "
             f"rounds of {args.steps} timed steps | CPU {cpu_capability()} (native bf16: "
             f"{'yes' if cpu_native_bf16() else 'no'}), precision {best[modes[0]]['precision']}")
    return args, best, title
