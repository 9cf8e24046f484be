"""Stop signals that arrive while a launch starts up (imports, config, model build, restore:
minutes for a large checkpoint), before the training loop's handler exists.

Without this a SIGTERM (preemption) or SIGUSR1 (SLURM's time-limit warning) in that window
kills the task with the signal's default action: no exit code 75, so the sbatch script does
not requeue. The launchers call `catch()` first thing (this module imports only `signal` and
`time`); the loop's `StopRequests` takes over what was received, and stops at its first step
boundary (saving that step, exit 75) as for any other stop signal. `catch()` also marks the
launch's start: `trainer.max_time` counts from there (imports, restore and index builds
included, as NeMo's timer does).
"""

from __future__ import annotations

import signal
import time
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: Optional[str] = None
_launched_at: Optional[float] = None


def _handle(signum, _frame) -> None:
    global _received
    _received = signal.Signals(signum).name


def catch() -> None:
    """Record SIGTERM/SIGUSR1 instead of dying of them, until the training loop takes over;
    the launch's clock starts here."""
    global _launched_at
    _launched_at = time.monotonic()
    for sig in SIGNALS:
        signal.signal(sig, _handle)


def received() -> Optional[str]:
    """The stop signal received during start-up, if any."""
    return _received


def launched_at() -> Optional[float]:
    """`time.monotonic()` when the launcher started (None: not started by a launcher)."""
    return _launched_at
