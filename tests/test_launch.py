"""Launch environments: torchrun, SLURM, plain python; the shipped scripts are well-formed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from danube.runtime import launch_info
from tests.conftest import ROOT


def test_launch_info_reads_torchrun_then_slurm(monkeypatch):
    """A SLURM task (srun: a job step) takes its rank from SLURM; the batch script of the
    allocation (SLURM_PROCID=0, SLURM_NTASKS, no step: measured on Slurm 22.05) is one
    process when the allocation has one task, refused by preflight otherwise."""
    from danube.config.compose import compose_pretrain_config
    from danube.config.preflight import detect_machine, preflight

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    assert launch_info().launcher == "single" and launch_info().world_size == 1
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert launch_info().launcher == "single"
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert launch_info().launcher == "slurm-batch"
    cfg = compose_pretrain_config("danube_tiny", ["trainer.devices=16"])
    assert any("started by plain python inside a SLURM allocation of 16 tasks" in p
               for p in preflight(cfg, detect_machine()))
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    info = launch_info()
    assert (info.rank, info.local_rank, info.world_size, info.launcher) == (5, 1, 16, "slurm")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_info().launcher == "torchrun"  # torchrun inside an allocation wins


def test_shell_scripts_parse():
    for script in ("launchers/slurm/pretrain.sbatch", "launchers/slurm/sft.sbatch",
                   "launchers/slurm/dpo.sbatch", ".ci/run", "tests/helpers/install_slurm.sh",
                   "bench/gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_image_stack_guard_fails_when_pip_replaced_torch(tmp_path):
    """The Dockerfile records the image's torch/TE before `pip install` and verifies after;
    here the record says another torch was there, as if pip had replaced it."""
    import json

    guard = [sys.executable, str(ROOT / "docker" / "image_stack.py")]
    record = tmp_path / "stack.json"
    subprocess.run([*guard, "record", str(record)], check=True, capture_output=True)
    assert "torch" in json.loads(record.read_text())
    kept = subprocess.run([*guard, "verify", str(record)], capture_output=True, text=True)
    assert kept.returncode == 0, kept.stderr
    stack = json.loads(record.read_text())
    stack["torch"][0] = "2.8.0a0+5228986c39.nv25.06"
    record.write_text(json.dumps(stack))
    replaced = subprocess.run([*guard, "verify", str(record)], capture_output=True, text=True)
    assert replaced.returncode == 1
    assert "pip replaced the image's torch: ['2.8.0a0+5228986c39.nv25.06'" in replaced.stderr


def test_docker_context_leaves_outputs_data_and_environments_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"results/", "data/", ".venv/", ".git/"} <= set(ignored)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=" in dockerfile and "CUDA_DEVICE_MAX_CONNECTIONS=1" in dockerfile
    assert dockerfile.count("image_stack.py verify") == 2


def _fake_slurm(tmp_path, srun_exit: int):
    """`srun` and `scontrol` stand-ins on PATH: each records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", f'echo "$@" >> {tmp_path}/srun.log; exit {srun_exit}'),
                       ("scontrol", f'echo "$@" >> {tmp_path}/scontrol.log; echo node1')):
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "41",
            "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1",
            "SLURM_NTASKS_PER_NODE": "8", "SLURM_SUBMIT_DIR": str(ROOT)}


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_sft_and_dpo_batch_scripts_run_their_stage_through_the_shared_script(tmp_path, stage):
    """sft.sbatch / dpo.sbatch hand over to pretrain.sbatch with their launcher and default
    config, the user's overrides last; a stop (exit 75) requeues the job as for pretraining."""
    env = _fake_slurm(tmp_path, srun_exit=75)
    count = ROOT / ".danube-requeues-41"  # the script's own requeue count (the fake job's)
    count.unlink(missing_ok=True)
    try:
        run = subprocess.run(["bash", f"launchers/slurm/{stage}.sbatch", "trainer.max_steps=5"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert count.read_text().strip() == "1"  # requeued once by the script
    finally:
        count.unlink(missing_ok=True)  # no real rerun will clear it
    assert run.returncode == 75, run.stderr
    srun = (tmp_path / "srun.log").read_text().split()
    assert srun[srun.index("python") + 1] == f"launchers/{stage}.py"
    assert srun[srun.index("--config-name") + 1] == f"danube_1.8b_chat_{stage}"
    assert srun[-1] == "trainer.max_steps=5" and "trainer.devices=8" in srun
    assert "requeue 41" in (tmp_path / "scontrol.log").read_text()
    env["STAGE"] = "eval"
    bad = subprocess.run(["bash", "launchers/slurm/pretrain.sbatch"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "use pretrain, sft or dpo" in bad.stderr
