"""Shared helpers: launcher subprocesses, metrics, and one in-process megatron world."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from tests.helpers import warm

# The suite is the CPU path: on a GPU host it hides the GPUs (before anything imports torch or
# asks CUDA), from this process and from every launcher it starts, and so serves as a CPU
# smoke test there too. DANUBE_GPU_TESTS=1 leaves them visible for the GPU suite
# (tests/gpu, `pytest -m gpu`; bench/gpu_acceptance.py runs it).
GPU_TESTS = os.environ.get("DANUBE_GPU_TESTS") == "1"
if not GPU_TESTS:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

ROOT = Path(__file__).resolve().parents[1]
# Launches fork from a server that has imported the stack once (tests/helpers/warm.py);
# DANUBE_TEST_COLD=1 starts each as its own interpreter (torchrun for nproc > 1) instead.
# The GPU suite always launches cold (nothing CUDA-related may precede a fork there).
WARM = os.environ.get("DANUBE_TEST_COLD") != "1" and not GPU_TESTS
LAUNCHER = ROOT / "launchers" / "pretrain.py"
SFT_LAUNCHER = ROOT / "launchers" / "sft.py"
DPO_LAUNCHER = ROOT / "launchers" / "dpo.py"

# A small danube_tiny for equivalence runs: 4 layers so PP=2 x VP=2 has a layer per chunk.
SMALL_MODEL = [
    "model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=160",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.window_size=48",
    "model.encoder_seq_length=64", "model.max_position_embeddings=64",
    "model.micro_batch_size=4", "model.global_batch_size=8",
]
QUIET = [
    "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0", "trainer.limit_test_batches=0",
    "exp_manager.create_tensorboard_logger=false",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_pretrain(overrides: List[str], nproc: int = 1, check: bool = True,
                 timeout: int = 600, launcher: Path = LAUNCHER,
                 cold: bool = False) -> subprocess.CompletedProcess:
    """Run launchers/pretrain.py (or another launcher) as a user would: warm (forked from
    the preloaded server, one process per rank with torchrun's variables) unless `cold` or
    DANUBE_TEST_COLD=1, then its own interpreter (torchrun for nproc > 1)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1" if nproc > 1 else "2"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    port = free_port()
    args = list(overrides) if nproc == 1 else [f"trainer.devices={nproc}", *overrides]
    if nproc == 1:
        cmd = [sys.executable, str(launcher), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={port}", str(launcher), *args]
    if WARM and not cold:
        result = warm.run(str(launcher), args, env, str(ROOT), nproc, port, timeout, cmd)
    else:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                                cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n"
                             f"--- stdout ---\n{result.stdout[-4000:]}\n"
                             f"--- stderr ---\n{result.stderr[-8000:]}")
    return result


class Launch:
    """A launch running in the background (warm, or cold in its own session), for tests that
    signal it mid-run: `signal` reaches its whole process group, as SLURM signals every
    process of a job step (loader workers and checkpoint writers included)."""

    def __init__(self, overrides: List[str], launcher: Path = LAUNCHER, cold: bool = False):
        import tempfile

        self.folder = tempfile.mkdtemp(prefix="danube-launch-")
        self.out, self.err = (os.path.join(self.folder, n) for n in ("out", "err"))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        args = [str(launcher), *overrides]
        if WARM and not cold:
            self.proc = warm.start(args[0], args[1:], env, str(ROOT), self.out, self.err)
            self.pid = self.proc.pid
        else:
            with open(self.out, "w") as out, open(self.err, "w") as err:
                self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                                             stdout=out, stderr=err, start_new_session=True)
            self.pid = self.proc.pid

    def stdout(self) -> str:
        return Path(self.out).read_text() if os.path.exists(self.out) else ""

    def stderr(self) -> str:
        return Path(self.err).read_text() if os.path.exists(self.err) else ""

    def wait_for(self, text: str, timeout: float = 300) -> float:
        """Block until `text` is in its stdout (fails if it ends first); the time then."""
        import time

        deadline = time.monotonic() + timeout
        while text not in self.stdout():
            assert self.poll() is None, f"ended ({self.poll()}) before {text!r}:\n" \
                f"{self.stdout()[-2000:]}\n{self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} in {timeout} s"
            time.sleep(0.02)
        return time.monotonic()

    def signal(self, sig) -> None:
        os.killpg(self.pid, sig)

    def poll(self):
        return self.proc.poll()

    def wait(self, timeout: float):
        """The exit code within `timeout` s, else None (and the whole group is killed)."""
        import signal
        import time

        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        code = self.poll()
        if code is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return code


def run_script(script: Path, args: List[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`python <script> <args>` from the repository root (warm like run_pretrain); not
    checked."""
    cmd = [sys.executable, str(script), *args]
    if WARM:
        return warm.run(str(script), list(args), dict(os.environ), str(ROOT), 1, 0, timeout,
                        cmd)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def run_sft(overrides: List[str], nproc: int = 1, check: bool = True,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run launchers/sft.py as a user would."""
    return run_pretrain(overrides, nproc, check, timeout, launcher=SFT_LAUNCHER)


def run_dpo(overrides: List[str], nproc: int = 1, check: bool = True,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run launchers/dpo.py as a user would."""
    return run_pretrain(overrides, nproc, check, timeout, launcher=DPO_LAUNCHER)


def write_indexed(prefix: str, documents: List[List[int]]) -> None:
    """A Megatron indexed dataset <prefix>.bin/.idx holding `documents` (token id lists)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in documents:
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")


def blend_with_a_small_source(tmp_path: Path) -> str:
    """A data_prefix override: embedded:prose blended half and half with 100 five-token
    documents, ~7 samples of 64 tokens per epoch, so that source runs several epochs and its
    order depends on the index size (megatron-core shuffles a source over all its epochs)."""
    import random

    rng = random.Random(0)
    prefix = tmp_path / "small_source"
    write_indexed(str(prefix), [[rng.randrange(100, 4000) for _ in range(5)] for _ in range(100)])
    return f"model.data.data_prefix=[0.5,embedded:prose,0.5,{prefix}]"


def saved_weights(checkpoint: Path) -> dict:
    """A dist_checkpointing checkpoint's model tensors, read without a process group."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(flat))
    state = torch.load(flat, weights_only=False)
    flat.unlink()
    return {k: v for k, v in state.items()
            if k.startswith(("embedding.", "decoder.", "output_layer.")) and torch.is_tensor(v)}


def read_metrics(exp_dir: Path) -> List[dict]:
    path = exp_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_records(exp_dir: Path) -> dict:
    """step -> training record (the last wins when a resumed run re-logs a step)."""
    return {r["step"]: r for r in read_metrics(exp_dir) if "loss" in r}


def train_losses(exp_dir: Path) -> dict:
    """step -> training loss (the last record wins when a resumed run re-logs a step)."""
    return {r["step"]: r["loss"] for r in read_metrics(exp_dir) if "loss" in r}


# A conversation the chat tests share (tokenizer_dir's tokenizer is trained on its texts).
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does `os.getcwd` do?"},
        {"role": "assistant", "content": "Return a string of the current directory."},
        {"role": "user", "content": "Which module is it in?"},
        {"role": "assistant", "content": "It is in `os`."}]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """Our byte-level BPE (specials <pad> <s> </s> <|system|> <|prompt|> <|answer|>) as a HF
    tokenizer directory with the H2O-Danube template, as data preparation writes it."""
    from danube.data.chat import DANUBE_CHAT_TEMPLATE
    from danube.data.tokenizer import train_byte_level_bpe

    path = tmp_path_factory.mktemp("tok")
    texts = [m["content"] for m in CHAT] * 30 + ["def f(x):\n    return x + 1"] * 30
    train_byte_level_bpe(texts, 400).save(path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "chat_template": DANUBE_CHAT_TEMPLATE}))
    return path


@pytest.fixture(scope="session")
def megatron_world():
    """torch.distributed (gloo, one process) + megatron parallel state, in this process."""
    import torch

    from danube.config.schema import ModelConfig
    from danube.training.distributed import init_distributed, shutdown

    os.environ.pop("RANK", None)
    init_distributed(ModelConfig(), "cpu")
    yield
    shutdown()
    torch.set_default_device(None)


@pytest.fixture(scope="session")
def init_checkpoint(tmp_path_factory) -> Path:
    """Step-0 weights of the small model, shared by the parallel-equivalence runs."""
    exp = tmp_path_factory.mktemp("init")
    run_pretrain([*SMALL_MODEL, *QUIET, "trainer.precision=32", "trainer.max_steps=0",
                  "model.optim.sched.max_steps=10", "model.optim.sched.warmup_steps=2",
                  f"exp_manager.exp_dir={exp}", "exp_manager.name=init"])
    return exp / "init" / "checkpoints" / "step_00000000"


DP2_DISTRIBUTED_STEPS = 30


def dp2_distributed_args(exp_dir: Path, init: Path) -> List[str]:
    """Two data-parallel ranks with the distributed optimizer, from the shared step-0 weights,
    a checkpoint every 2 steps (all kept): the run behind `dp2_distributed_straight`, and the
    arguments a resumed or SLURM-launched copy of it repeats."""
    return [*SMALL_MODEL, *QUIET, "trainer.precision=32",
            f"trainer.max_steps={DP2_DISTRIBUTED_STEPS}",
            f"model.optim.sched.max_steps={DP2_DISTRIBUTED_STEPS}",
            "model.optim.sched.warmup_steps=2", "model.optim.name=distributed_fused_adam",
            f"model.restore_from_path={init}", f"exp_manager.exp_dir={exp_dir}",
            "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
            f"exp_manager.checkpoint_callback_params.save_top_k={DP2_DISTRIBUTED_STEPS}"]


@pytest.fixture(scope="session")
def dp2_distributed_straight(tmp_path_factory, init_checkpoint) -> Path:
    """An uninterrupted 2-process run (torchrun) with the distributed optimizer: the
    reference of the resume tests that stop and continue the same run (its exp dir, with
    the run's console output in stdout.txt). Its checkpoints are written in the background
    (async_save): the resume tests start from them. Launched cold, with torchrun: the
    suite's one torchrun launch, and what the warm launches (the resumed runs) must
    reproduce bit for bit."""
    exp = tmp_path_factory.mktemp("dp2_distributed")
    run = run_pretrain([*dp2_distributed_args(exp, init_checkpoint), "exp_manager.name=straight",
                        "exp_manager.checkpoint_callback_params.async_save=true"], nproc=2,
                       cold=True)
    (exp / "straight" / "stdout.txt").write_text(run.stdout)
    return exp / "straight"


def pytest_sessionfinish(session, exitstatus):
    warm.stop_server()
