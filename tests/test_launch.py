"""Launch environments: torchrun, SLURM, plain python; the shipped scripts are well-formed."""

from __future__ import annotations

import subprocess
import sys

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
    for script in ("launchers/slurm/pretrain.sbatch", ".ci/run",
                   "tests/helpers/install_slurm.sh"):
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
