"""Stopping on purpose: SIGTERM/SIGUSR1 (preemption, a SLURM time limit's warning) and
`trainer.max_time`.

A signal only sets a flag (a handler that saved from inside the signal would race the step
in flight). SLURM signals every process of the job step, children included: helper processes
(dist_checkpointing's writer Manager, data-loader workers) are started with the stop signals
blocked (`children_ignore_stop_signals`), so a warning signal cannot kill them under the run
(found on the real SLURM: the next save died on a broken pipe). At
every step boundary the ranks agree with one small all-reduce (MAX of "I want to stop"), so
all of them save the same step and leave together, with exit code 75 (EX_TEMPFAIL: "stopped
to be resumed"), which the sbatch scripts requeue on.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from danube import startup_signals

STOPPED_EXIT_CODE = 75
SIGNALS = startup_signals.SIGNALS  # SIGTERM, SIGUSR1


@contextmanager
def children_ignore_stop_signals() -> Iterator[None]:
    """Block SIGTERM/SIGUSR1 in this thread while the body starts helper processes: they
    inherit the mask (fork and exec alike) and never see the signals; here a signal that
    arrives meanwhile stays pending and is handled when the body ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopRequests:
    def __init__(self, max_time_s: Optional[float]):
        self.max_time_s = max_time_s
        self.start = time.monotonic()
        self.received: Optional[str] = startup_signals.received()  # came during start-up
        self._previous = {}
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _local(self, step_time: float) -> int:
        if self.received:
            return 2
        # leave room for one more step and a save (a save costs about a few steps here)
        if self.max_time_s is not None and \
                time.monotonic() - self.start + 3 * step_time >= self.max_time_s:
            return 1
        return 0

    def agreed(self, step_time: float, device: torch.device) -> Optional[str]:
        """Collective: why every rank stops now (any rank's signal, or the time limit)."""
        want = torch.tensor([self._local(step_time)], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(want, op=torch.distributed.ReduceOp.MAX)
        code = int(want.item())
        if code == 2:
            return f"a stop signal ({self.received or 'on another rank'})"
        if code == 1:
            return f"trainer.max_time ({self.max_time_s:.0f} s) would be passed by the next step"
        return None
