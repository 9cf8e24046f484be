"""Stops that end the process: every way out of a run (a stop signal, trainer.max_time, a
second signal, a finished run, a failure) exits with its documented code within seconds,
whatever the data-loader workers and checkpoint writers are doing, and leaves no process
behind. The runs are signalled as SLURM does: the whole process group (workers included)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import QUIET, SMALL_MODEL, Launch, read_metrics, run_pretrain

STOP_BOUND_S = 30  # the bound from the stop to the exit, on a 2-core CPU


def _group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _args(tmp_path, name: str, workers: int, *extra: str) -> list:
    """A small run with `workers` loader workers; `extra` overrides replace the same keys."""
    base = [*SMALL_MODEL, *QUIET, "trainer.precision=32", "trainer.max_steps=100000",
            "model.optim.sched.max_steps=100000", "model.optim.sched.warmup_steps=2",
            f"model.data.num_workers={workers}",
            "exp_manager.checkpoint_callback_params.every_n_train_steps=0",
            f"exp_manager.exp_dir={tmp_path}", f"exp_manager.name={name}"]
    replaced = {e.split("=")[0] for e in extra}
    return [a for a in base if a.split("=")[0] not in replaced] + list(extra)


def _assert_stopped(launch: Launch, tmp_path, name: str, since: float) -> None:
    code = launch.wait(STOP_BOUND_S)
    took = time.monotonic() - since
    assert code == 75, (code, f"{took:.1f} s", launch.stdout()[-1500:], launch.stderr()[-3000:])
    assert took < STOP_BOUND_S
    deadline = time.monotonic() + 5
    while not _group_gone(launch.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _group_gone(launch.pid), "a child of the run outlived it"
    out = launch.stdout()
    stopped = [line for line in out.splitlines() if line.startswith("stopped after step")]
    assert len(stopped) == 1, out[-2000:]
    step = int(stopped[0].split()[3])
    steps = [r["step"] for r in read_metrics(tmp_path / name) if "loss" in r]
    assert steps == list(range(1, step + 1))
    assert [p.name for p in (tmp_path / name / "checkpoints").iterdir()] == [
        f"step_{step:08d}"]


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("how", ["SIGTERM", "SIGUSR1", "max_time"])
def test_a_stop_exits_75_promptly_with_loader_workers(tmp_path, workers, how):
    """The shipped 1.8B configs read with 2 loader workers; their workers block the stop
    signals (so SLURM's signal to the whole step cannot kill them under the run). A stop used
    to save, say "stopped", and then wait forever on those workers (SIGTERM to a process
    that blocks it). Now: exit 75 within seconds, the stop step saved, no process left."""
    extra = ("trainer.max_time=00:00:00:12",) if how == "max_time" else ()
    launch = Launch(_args(tmp_path, "stop", workers, *extra))
    try:
        if how == "max_time":
            since = launch.wait_for("stopped after step", timeout=120)
        else:
            launch.wait_for("step 3/", timeout=120)
            since = time.monotonic()
            launch.signal(getattr(signal, how))
        _assert_stopped(launch, tmp_path, "stop", since)
        if how != "max_time":
            assert f"a stop signal ({how})" in launch.stdout()
    finally:
        launch.wait(0)


def test_a_second_stop_signal_is_not_swallowed(tmp_path):
    """Two SIGTERMs (a scheduler that insists): the second ends the process at once, or
    right after a save already under way, with exit 75 (the last committed checkpoint is the
    resume point). It used to be recorded and ignored like the first."""
    launch = Launch(_args(tmp_path, "twice", 2, "model.num_layers=8", "model.hidden_size=128"))
    try:
        launch.wait_for("step 2/", timeout=120)
        since = time.monotonic()
        launch.signal(signal.SIGTERM)
        time.sleep(0.02)
        launch.signal(signal.SIGTERM)
        code = launch.wait(STOP_BOUND_S)
        assert code == 75, (code, launch.stderr()[-3000:])
        assert time.monotonic() - since < STOP_BOUND_S
        assert "second stop signal (SIGTERM)" in launch.stderr()
        assert _group_gone(launch.pid) or not time.sleep(2) and _group_gone(launch.pid)
    finally:
        launch.wait(0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_finished_or_failed_run_exits_with_loader_workers(tmp_path, workers):
    """A run that finishes (exit 0) and one that fails inside a step (a divergence: exit 3)
    end with their codes while the loader's workers are running, none left behind."""
    done = run_pretrain(_args(tmp_path, "done", workers, "trainer.max_steps=3",
                              "model.optim.sched.max_steps=3"), timeout=120)
    assert "saved checkpoint" in done.stdout
    failed = run_pretrain(_args(tmp_path, "nan", workers, "model.optim.lr=1e30",
                                "model.optim.sched.warmup_steps=0"), check=False, timeout=120)
    assert failed.returncode == 3, failed.stderr[-2000:]


def test_every_rank_takes_the_same_save_decision_when_one_view_lags(tmp_path, monkeypatch):
    """Two ranks, rank 0's view of the checkpoint directory lagging (nothing looks complete
    there; tests/helpers/lagging_view.py); rank 0 is the one that reports (the stop message
    comes after its save). Every step is checkpointed, so the stop step and
    the last step are already saved when the loop asks: a rank deciding from its own view
    entered the save alone and the job hung. Both the max_time stop (exit 75) and the end of
    the run (exit 0) now decide from the step the loop committed."""
    from tests.conftest import ROOT

    monkeypatch.setenv("DANUBE_TEST_LAGGING_RANKS", "0")
    wrapper = ROOT / "tests" / "helpers" / "lagging_view.py"
    common = ["exp_manager.checkpoint_callback_params.every_n_train_steps=1",
              "exp_manager.checkpoint_callback_params.save_top_k=2"]
    stopped = run_pretrain(_args(tmp_path, "stop", 0, *common, "trainer.max_time=00:00:00:10"),
                           nproc=2, launcher=wrapper, check=False, timeout=90)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert "stopped after step" in stopped.stdout
    finished = run_pretrain(_args(tmp_path, "end", 0, *common, "trainer.max_steps=3",
                                  "model.optim.sched.max_steps=3"),
                            nproc=2, launcher=wrapper, timeout=90)
    assert "step 3/3" in finished.stdout
    names = {p.name for p in (tmp_path / "end" / "checkpoints").iterdir()}
    # (pruning, rank 0's alone, sees nothing complete through the lagging view: it keeps all)
    assert {"step_00000002", "step_00000003"} <= names and not any(
        n.startswith(".tmp-") for n in names)
