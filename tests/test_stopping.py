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


def _async_saves(steps: int, every: int, keep: int) -> list:
    """A run of `steps` steps checkpointing every `every` in the background, `keep` kept."""
    params = "exp_manager.checkpoint_callback_params"
    return [f"trainer.max_steps={steps}", f"model.optim.sched.max_steps={steps}",
            f"{params}.every_n_train_steps={every}", f"{params}.save_top_k={keep}",
            f"{params}.async_save=true"]


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
    extra = ("trainer.max_time=00:00:00:06",) if how == "max_time" else ()
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


def test_a_killed_background_writer_is_survived(tmp_path, monkeypatch):
    """Every background checkpoint write dies (its writer SIGKILLed as the OOM killer would:
    fault injection DANUBE_INJECT_WRITER_KILL_AT_STEPS). Each failure is logged by step with
    the resume point kept; training goes on; the max_time stop still writes its blocking save
    and exits 75. It used to die of megatron's CheckpointException at the next step boundary."""
    monkeypatch.setenv("DANUBE_INJECT_WRITER_KILL_AT_STEPS", ",".join(map(str, range(2, 400, 2))))
    launch = Launch(_args(tmp_path, "killed", 0, "trainer.max_time=00:00:00:08",
                          "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
                          "exp_manager.checkpoint_callback_params.async_save=true"))
    try:
        since = launch.wait_for("stopped after step", timeout=120)
        _assert_stopped(launch, tmp_path, "killed", since)
    finally:
        launch.wait(0)
    out = launch.stdout()
    assert "warning: step 2: the background write of checkpoint" in out
    assert "the resume point stays none" in out
    assert "written in the background" not in out  # every background write died


def _small_tmpfs(path, megabytes: int):
    import subprocess

    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs",
                              str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    return path


def test_a_full_disk_names_the_directory_and_the_space(tmp_path):
    """exp_dir on a 22 MB tmpfs, where one checkpoint of the small model (~15 MB with Adam)
    fits and a second does not: the background write of step 4 fails with ENOSPC, logged with
    the directory, the space a checkpoint needs and what is free; the run goes on; its final
    blocking save fails the same way and the run exits 4 with that message (not a
    traceback). The step-2 checkpoint, the resume point, is intact."""
    import subprocess

    disk = _small_tmpfs(tmp_path / "disk", 22)
    try:
        run = run_pretrain(_args(disk, "full", 0, *_async_saves(steps=4, every=2, keep=1)),
                           check=False, timeout=120)
        assert run.returncode == 4, (run.returncode, run.stdout[-2000:], run.stderr[-3000:])
        root = disk / "full" / "checkpoints"
        assert f"warning: step 4: the background write of checkpoint {root}" in run.stdout
        assert f"no space left on the device of {root}: a checkpoint needs about" in run.stdout
        assert "error: step 4: saving" in run.stderr and "MB are free" in run.stderr
        assert "Traceback" not in run.stderr
        assert [p.name for p in root.iterdir()] == ["step_00000002"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_max_steps_0_saves_the_initial_weights(tmp_path):
    """trainer.max_steps=0 (the shared start of several layouts, model.restore_from_path):
    step 0 is saved and the launch exits 0, the schedule's warmup notwithstanding. It crashed
    in data_plan (no training split to describe)."""
    run = run_pretrain(_args(tmp_path, "init", 0, "trainer.max_steps=0",
                             "model.optim.sched.max_steps=null",
                             "model.optim.sched.warmup_steps=30"))
    assert "step_00000000" in run.stdout
    assert [p.name for p in (tmp_path / "init" / "checkpoints").iterdir()] == ["step_00000000"]


def test_a_run_with_dropout_resumes_exactly(tmp_path):
    """Dropout draws from torch's CPU generator, saved with the checkpoint. The data loader
    took its workers' base seed from that generator too, once per loader: a resumed run made
    its loader after the restore, one draw off the straight run, and its dropout masks (and
    losses) differed from the resumed step on."""
    import shutil

    from tests.conftest import train_losses

    common = _args(tmp_path, "straight", 0, "trainer.max_steps=6",
                   "model.optim.sched.max_steps=6", "model.hidden_dropout=0.2",
                   "model.attention_dropout=0.2",
                   "exp_manager.checkpoint_callback_params.every_n_train_steps=3",
                   "exp_manager.checkpoint_callback_params.save_top_k=3")
    run_pretrain(common)
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_00000003",
                    tmp_path / "resumed" / "checkpoints" / "step_00000003")
    run_pretrain([a.replace("name=straight", "name=resumed") for a in common])
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert list(resumed) == [4, 5, 6]
    assert all(resumed[k] == straight[k] for k in (4, 5, 6)), (straight, resumed)


# ------------------------------------------------------------------ the parts, in this process

def test_monitor_val_loss_needs_save_steps_that_validate():
    from danube.config.compose import compose_pretrain_config
    from danube.config.validate import validate

    base = ["exp_manager.checkpoint_callback_params.monitor=val_loss", "trainer.max_steps=50",
            "trainer.val_check_interval=20", "trainer.limit_val_batches=2"]
    never = validate(compose_pretrain_config("danube_tiny", [
        *base, "exp_manager.checkpoint_callback_params.every_n_train_steps=30"]))
    assert any("no save step (every 30) is a validation step" in p for p in never), never
    assert validate(compose_pretrain_config("danube_tiny", [
        *base, "exp_manager.checkpoint_callback_params.every_n_train_steps=40"])) == []


def test_a_multi_node_exp_dir_on_a_local_filesystem_is_warned_about(tmp_path):
    from danube.config.compose import compose_pretrain_config
    from danube.config.preflight import filesystem_type, launch_warnings

    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {tmp_path}/shared nfs4 rw 0 0\n")
    (tmp_path / "shared").mkdir()
    assert filesystem_type(tmp_path / "shared" / "runs" / "new", str(mounts)) == "nfs4"
    assert filesystem_type(tmp_path / "local", str(mounts)) == "ext4"

    def warnings(exp_dir, nodes):
        cfg = compose_pretrain_config("danube_tiny", [f"exp_manager.exp_dir={exp_dir}",
                                                      f"trainer.num_nodes={nodes}"])
        return launch_warnings(cfg, str(mounts))

    local = warnings(tmp_path / "local", 2)
    assert len(local) == 1 and "is on a ext4 filesystem, local to this node" in local[0]
    assert warnings(tmp_path / "shared" / "runs", 2) == []
    assert warnings(tmp_path / "local", 1) == []


def test_a_signal_between_the_two_handlers_is_not_lost(monkeypatch):
    """The start-up handler records a signal until the loop's takes over; one arriving while
    the loop's handlers are being installed (after the start-up record was read, before the
    new handler is in place) used to be dropped."""
    import signal as signals

    from danube import startup_signals
    from danube.training.signals import StopRequests

    real = signals.signal
    monkeypatch.setattr(startup_signals, "_received", None)

    def install(sig, handler):
        if sig == signals.SIGUSR1:  # the signal lands mid-installation
            startup_signals._handle(signals.SIGTERM, None)
        return real(sig, handler)

    monkeypatch.setattr(signals, "signal", install)
    stops = StopRequests(None)
    try:
        assert stops.received == "SIGTERM"
    finally:
        stops.restore()


def test_max_time_counts_from_the_launch_and_keeps_a_measured_margin(monkeypatch):
    """NeMo's timer counts the whole job: the launch's start (startup_signals.catch), not the
    loop's. The margin is what this run measured: the next step, its validation and
    downstream evaluation when due, waiting for a save in flight, and the stop save."""
    import time as clock

    from danube import startup_signals
    from danube.training.signals import ExitCosts, StopRequests

    monkeypatch.setattr(startup_signals, "_launched_at", clock.monotonic() - 50.0)
    stops = StopRequests(60.0)
    try:
        assert stops.elapsed() >= 50.0
        assert stops._local(5.0) == 0 and stops._local(11.0) == 1
    finally:
        stops.restore()
    costs = ExitCosts(unmeasured_save=7.0)
    costs.note("step", 1.0)
    costs.note("step", 0.5)  # the longest is kept
    costs.note("validation", 3.0)
    costs.note("downstream", 20.0)
    assert costs.margin(False, False, False) == 1.0 + 7.0  # no save measured yet: estimate
    costs.note("save", 4.0)
    assert costs.margin(False, False, False) == 1.0 + 4.0
    assert costs.margin(True, False, True) == 1.0 + 3.0 + 4.0 + 4.0
    assert costs.margin(True, True, False) == 1.0 + 3.0 + 20.0 + 4.0


def test_a_divergence_names_the_checkpoint_really_committed_last(tmp_path, monkeypatch):
    """Step 3's loss is made NaN while step 2's checkpoint is still being written in the
    background: that write is finished and committed first, and the error names it (it
    named whatever the disk showed at that moment: step 1's)."""
    monkeypatch.setenv("DANUBE_INJECT_NAN_AT_STEPS", "3")
    run = run_pretrain(_args(tmp_path, "nan", 0, *_async_saves(steps=5, every=1, keep=5)),
                       check=False, timeout=120)
    assert run.returncode == 3, run.stderr[-2000:]
    root = tmp_path / "nan" / "checkpoints"
    assert f"Last good checkpoint: {root / 'step_00000002'}." in run.stderr
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002"]
