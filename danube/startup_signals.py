"""Stop signals that arrive while a launch starts up (imports, config, model build, restore:
minutes for a large checkpoint), before the training loop's handler exists.

Without this a SIGTERM (preemption) or SIGUSR1 (SLURM's time-limit warning) in that window
kills the task with the signal's default action: no exit code 75, so the sbatch script does
not requeue. The launchers call `catch()` first thing (this module imports only `signal`);
the loop's `StopRequests` takes over what was received, and stops at its first step boundary
(saving that step, exit 75) as for any other stop signal.
"""

from __future__ import annotations

import signal
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: Optional[str] = None


def _handle(signum, _frame) -> None:
    global _received
    _received = signal.Signals(signum).name


def catch() -> None:
    """Record SIGTERM/SIGUSR1 instead of dying of them, until the training loop takes over."""
    for sig in SIGNALS:
        signal.signal(sig, _handle)


def received() -> Optional[str]:
    """The stop signal received during start-up, if any."""
    return _received
