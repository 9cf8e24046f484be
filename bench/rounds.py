"""Alternating rounds of bench worker processes, each mode's best round kept.

Each mode runs in its own process (so its peak memory is its own); the modes alternate for
`rounds` rounds so that a shared machine's load hits them alike; a worker prints one JSON
object as its last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

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
