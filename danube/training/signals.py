"""Stopping on purpose: SIGTERM/SIGUSR1 (preemption, a SLURM time limit's warning) and
`trainer.max_time`, and leaving the process without a hang.

A signal only sets a flag (a handler that saved from inside the signal would race the step
in flight). SLURM signals every process of the job step, children included: helper processes
(dist_checkpointing's writer Manager, data-loader workers) are started with the stop signals
blocked (`children_ignore_stop_signals`), so a warning signal cannot kill them under the run
(found on the real SLURM: the next save died on a broken pipe). Such children cannot be ended
with SIGTERM either: `end_children` stops them without multiprocessing's unbounded join. At
every step boundary the ranks agree with one small all-reduce (MAX of "I want to stop"), so
all of them save the same step and leave together, with exit code 75 (EX_TEMPFAIL: "stopped
to be resumed"), which the sbatch scripts requeue on.

A second stop signal is never swallowed: during a save it ends the process right after that
save, otherwise at once (exit 75: the last committed checkpoint is the resume point).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from danube import startup_signals

STOPPED_EXIT_CODE = 75
SIGNALS = startup_signals.SIGNALS  # SIGTERM, SIGUSR1
UNMEASURED_SAVE_BYTES_PER_S = 200e6
"""Until this run has saved once, a save is estimated at its state's bytes at this rate (a
conservative local-disk/NFS figure; the measured duration replaces it after the first)."""


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


def end_children(grace_s: float = 3.0) -> None:
    """What interpreter exit does for multiprocessing children, bounded: finalizers (a
    Manager's shutdown, itself bounded), then SIGTERM, a join of at most `grace_s` in all, and
    SIGKILL for whoever is left. multiprocessing's own `_exit_function` joins forever, and our
    children block SIGTERM (the hang of a stop with data-loader workers)."""
    import multiprocessing
    import multiprocessing.util

    # torch's data loader turns a worker's death into an exception (its SIGCHLD handler);
    # here every child is meant to end
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    multiprocessing.util._run_finalizers(0)
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.is_alive():
            child.kill()
            child.join(1.0)


def exit_now(code: int = STOPPED_EXIT_CODE) -> None:
    """Leave at once (from a signal handler): every multiprocessing child SIGKILLed, nothing
    joined or flushed beyond stdout/stderr."""
    import multiprocessing

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        child.kill()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class ExitCosts:
    """What runs between a stop decision and the exit, as measured in this run (longest seen,
    seconds): `trainer.max_time` stops early enough for all of it."""

    step: float = 0.0
    validation: float = 0.0
    downstream: float = 0.0
    save: Optional[float] = None
    """A whole checkpoint save (blocking save, or an asynchronous one from start to commit)."""
    unmeasured_save: float = 0.0
    """The estimate used until a save is measured (state bytes / UNMEASURED_SAVE_BYTES_PER_S)."""

    def note(self, what: str, seconds: float) -> None:
        setattr(self, what, max(getattr(self, what) or 0.0, seconds))

    def margin(self, validates: bool, downstream: bool, save_in_flight: bool) -> float:
        """Seconds needed if the run goes on for one more step and then stops: that step,
        its validation and downstream evaluation when due, waiting for an asynchronous save
        in flight, and the blocking stop save."""
        save = self.unmeasured_save if self.save is None else self.save
        return (self.step + (self.validation if validates else 0.0)
                + (self.downstream if downstream else 0.0)
                + (save if save_in_flight else 0.0) + save)


class StopRequests:
    """The stop signals and the time limit of one training loop."""

    def __init__(self, max_time_s: Optional[float]):
        self.max_time_s = max_time_s
        launched = startup_signals.launched_at()
        self.start = time.monotonic() if launched is None else launched
        self.received: Optional[str] = None
        self.saving = 0
        self.exit_after_save = False
        self._previous = {}
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        # read after our handler is in place: a signal in between is in one of the two
        self.received = self.received or startup_signals.received()

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            return
        if self.saving:
            self.exit_after_save = True
            print(f"second stop signal ({name}): exiting as soon as the save in progress is "
                  "committed", file=sys.stderr, flush=True)
            return
        print(f"second stop signal ({name}): exiting now without saving; the run resumes "
              "from its last committed checkpoint", file=sys.stderr, flush=True)
        exit_now()

    @contextmanager
    def during_save(self) -> Iterator[None]:
        """A second signal in here waits for the save (then exits 75)."""
        self.saving += 1
        try:
            yield
        finally:
            self.saving -= 1
        if self.exit_after_save and not self.saving:
            exit_now()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def _local(self, margin_s: float) -> int:
        if self.received:
            return 2
        if self.max_time_s is not None and self.elapsed() + margin_s >= self.max_time_s:
            return 1
        return 0

    def agreed(self, margin_s: float, device: torch.device) -> Optional[str]:
        """Collective: why every rank stops now (any rank's signal, or the time limit, which
        one more step and what follows it, `margin_s` seconds, would pass)."""
        want = torch.tensor([self._local(margin_s)], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(want, op=torch.distributed.ReduceOp.MAX)
        code = int(want.item())
        if code == 2:
            return f"a stop signal ({self.received or 'on another rank'})"
        if code == 1:
            return (f"trainer.max_time ({self.max_time_s:.0f} s from the launch) would be "
                    f"passed by the next step and the stop after it ({margin_s:.1f} s)")
        return None
