"""GPU acceptance: what to run on a GPU machine before a long job, and on any GPU we get.

    python bench/gpu_acceptance.py                 # everything, ~15-20 min on one H100/H200
    python bench/gpu_acceptance.py --skip-cpu-suite --json results/acceptance.json
    python bench/gpu_acceptance.py --plan          # the stages and their commands; runs nothing

On a machine lent for minutes, bound the whole run and keep what each stage printed:

    python bench/gpu_acceptance.py --skip-cpu-suite --budget 540 --logs $OUT --json $OUT/a.json

Each stage's limit is cut to what is left of --budget, and a stage with under 30 s left is
not run (the run then exits 1); each stage's row is printed as it ends and --json is
rewritten after each one; --logs keeps every stage's whole output. A run killed from outside
still leaves what it had measured.

Stages, each in its own process with its own time limit, one table at the end:
  environment    GPU, CUDA, torch, Triton, megatron-core, Transformer Engine, apex
  cpu-suite      the CPU test suite on this host (it hides the GPUs: a CPU smoke test here)
  gpu-suite      `pytest -m gpu tests/gpu`: FlexAttention == SDPA (forward, backward, packed),
                 bf16 resume == straight on NCCL/CUDA RNG, 2-layer danube_1.8b with the
                 distributed optimizer saved and resumed, an HF import loaded and trained,
                 packed SFT == unpacked, KV-cached generation == recompute, the bench worker
  te-bf16/te-fp8 with Transformer Engine only: the TE layer spec without and with FP8
  throughput-S   bench/throughput.py, danube_1.8b's architecture at sequence length S (2048,
                 8192, 16384 by default), bf16, no TE: tokens/s/GPU, MFU (causal + window
                 FLOPs, and Megatron's), peak memory
  knob-K         with --knobs: the 2048 bench with one speed knob turned off, to measure it
Exit status 0 when every stage passed. Targets (issue 14, one H100, bf16, no TE): >= 40K
tokens/s/GPU at 2048; 16384 with the window >= 0.8x that; micro-batch 8 x 2048 fits 80 GB.
The figures belong in docs/benchmarks.md with the GPU named.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
# Tokens per micro-batch held at 16384, as in danube_1.8b's ramp.
SEQ_MICRO_BATCH = {2048: 8, 4096: 4, 8192: 2, 16384: 1}
# Each knob's "off" override (the fast default is on); measured at 2048 with --knobs.
KNOBS = {
    "flex-attention": "model.attention_backend=sdpa",
    "activation-fusion": "model.bias_activation_fusion=false",
    "cross-entropy-fusion": "model.cross_entropy_loss_fusion=false",
    "grad-accumulation-fusion": "model.gradient_accumulation_fusion=false",
}


@dataclass
class Stage:
    name: str
    command: List[str]
    timeout: int
    env: dict = field(default_factory=dict)
    needs_te: bool = False


@dataclass
class Outcome:
    stage: Stage
    status: str  # passed | FAILED | skipped (does not apply) | timeout | not-run (budget)
    seconds: float
    figure: str = ""
    detail: Optional[dict] = None


def peak_tflops(gpu_name: str) -> Optional[float]:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu_name), None)


def throughput_command(seq: int, peak: Optional[float], out: Path, extra=(),
                       steps: int = 10) -> List[str]:
    mbs = SEQ_MICRO_BATCH[seq]
    cmd = [sys.executable, "bench/throughput.py", "--arch", "danube_1.8b",
           "--engines", "danube-bf16", "--rounds", "1", "--steps", str(steps), "--warmup", "3",
           "--json", str(out), "trainer.accelerator=gpu", "model.transformer_engine=false",
           f"model.encoder_seq_length={seq}", f"model.micro_batch_size={mbs}",
           f"model.global_batch_size={mbs}", *extra]
    return cmd + (["--peak-tflops", str(peak)] if peak else [])


def plan(args, scratch: Path, peak: Optional[float]) -> List[Stage]:
    py = sys.executable
    gpu_env = {"DANUBE_GPU_TESTS": "1"}
    stages = [Stage("environment", [py, __file__, "--environment"], 120)]
    if not args.skip_cpu_suite:
        stages.append(Stage("cpu-suite", [py, "-m", "pytest", "-q", "-x", "tests",
                                          "--ignore=tests/gpu"], 1500))
    stages.append(Stage("gpu-suite", [py, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu"], 900,
                        gpu_env))
    tiny = [py, "launchers/pretrain.py", "trainer.accelerator=gpu", "trainer.max_steps=20",
            "trainer.limit_val_batches=0", "trainer.limit_test_batches=0",
            "exp_manager.resume_if_exists=false", "exp_manager.create_tensorboard_logger=false"]
    for fp8 in (False, True):
        name = "te-fp8" if fp8 else "te-bf16"
        stages.append(Stage(name, [*tiny, f"exp_manager.exp_dir={scratch / name}",
                                   f"model.fp8={str(fp8).lower()}",
                                   "model.transformer_engine=true"], 600, needs_te=True))
    for seq in args.seq:
        stages.append(Stage(f"throughput-{seq}",
                            throughput_command(seq, peak, scratch / f"throughput-{seq}.json"),
                            600))
    if args.knobs:
        for knob, off in KNOBS.items():
            stages.append(Stage(f"knob-{knob}-off", throughput_command(
                2048, peak, scratch / f"knob-{knob}-off.json", [off]), 600))
    return stages


def environment() -> None:
    import importlib.util

    import torch

    facts = {"torch": torch.__version__, "cuda": torch.version.cuda,
             "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
             "capability": (".".join(map(str, torch.cuda.get_device_capability()))
                            if torch.cuda.is_available() else None)}
    for module in ("triton", "megatron.core", "transformer_engine", "apex"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            facts[module] = None
            continue
        try:
            imported = __import__(module, fromlist=["__version__"])
            facts[module] = getattr(imported, "__version__", "present")
        except Exception as error:  # a broken install is a finding, not a crash
            facts[module] = f"broken: {type(error).__name__}"
    print(json.dumps(facts))


def _figure(stage: Stage, stdout: str) -> tuple:
    """A stage's one-line figure (and its parsed result) from what it printed or wrote."""
    if stage.name == "environment":
        facts = json.loads(stdout.strip().splitlines()[-1])
        return (f"{facts['gpu']} (sm {facts['capability']}), torch {facts['torch']}, "
                f"mcore {facts['megatron.core']}, TE {facts['transformer_engine']}"), facts
    json_arg = stage.command[stage.command.index("--json") + 1] if "--json" in stage.command \
        else None
    if json_arg and Path(json_arg).is_file():
        r = json.loads(Path(json_arg).read_text())[0]
        return (f"{r['tokens_per_s']:,.0f} tok/s/GPU, MFU {r['mfu']} (Megatron "
                f"{r['mfu_megatron']}), peak {r['peak_mib'] / 1024:.1f} GiB"), r
    lines = [line for line in stdout.splitlines() if " passed" in line or " failed" in line]
    return (lines[-1].strip("= ") if lines else ""), None


# A stage left with less than this of the budget is skipped rather than started to be killed.
MIN_STAGE_SECONDS = 30


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def run_stage(stage: Stage, te: bool, timeout: Optional[float] = None,
              logs: Optional[Path] = None) -> Outcome:
    """One stage in its own process, limited to `timeout` (default the stage's own); its
    whole output goes to <logs>/<stage>.log when `logs` is given."""
    if stage.needs_te and not te:
        return Outcome(stage, "skipped", 0.0, "Transformer Engine not installed")
    limit = stage.timeout if timeout is None else timeout
    start = time.perf_counter()
    try:
        out = subprocess.run(stage.command, cwd=ROOT, capture_output=True, text=True,
                             timeout=limit,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", **stage.env})
        stdout, stderr = out.stdout, out.stderr
    except subprocess.TimeoutExpired as expired:
        out, stdout, stderr = None, _text(expired.stdout), _text(expired.stderr)
    seconds = time.perf_counter() - start
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{stage.name}.log").write_text(
            f"$ {' '.join(stage.command)}\n{stdout}\n--- stderr ---\n{stderr}")
    if out is None:
        return Outcome(stage, "timeout", seconds, f"over {limit:.0f} s")
    if out.returncode != 0:
        tail = (stdout + stderr).strip().splitlines()[-12:]
        print(f"--- {stage.name} failed (exit {out.returncode}):\n" + "\n".join(tail))
        return Outcome(stage, "FAILED", seconds, f"exit {out.returncode}")
    figure, detail = _figure(stage, stdout)
    return Outcome(stage, "passed", seconds, figure, detail)


def _row(o: Outcome) -> str:
    return f"{o.stage.name:<32} {o.status:<8} {o.seconds:>7.1f}  {o.figure}"


def run_stages(stages: List[Stage], te: bool, budget: Optional[float] = None,
               logs: Optional[Path] = None, json_path: Optional[Path] = None) -> List[Outcome]:
    """The stages in order, each one's row printed as it ends and `json_path` rewritten
    after each; with `budget` (seconds for the whole run) a stage's limit is cut to what is
    left, and a stage with under MIN_STAGE_SECONDS left is not run (and fails the run)."""
    started, outcomes = time.perf_counter(), []
    for stage in stages:
        left = None if budget is None else budget - (time.perf_counter() - started)
        print(f"[{time.strftime('%H:%M:%S')}] {stage.name} ...", flush=True)
        applies = te or not stage.needs_te
        if applies and left is not None and left < MIN_STAGE_SECONDS:
            outcome = Outcome(stage, "not-run", 0.0, f"budget spent ({budget:.0f} s)")
        else:
            outcome = run_stage(stage, te, None if left is None else min(stage.timeout, left),
                                logs)
        outcomes.append(outcome)
        print(f"[{time.strftime('%H:%M:%S')}] {_row(outcome)}", flush=True)
        if json_path is not None:
            json_path.write_text(json.dumps(
                [{"stage": o.stage.name, "status": o.status, "seconds": o.seconds,
                  "figure": o.figure, "detail": o.detail} for o in outcomes], indent=1))
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true", help="list the stages; run nothing")
    parser.add_argument("--skip-cpu-suite", action="store_true")
    parser.add_argument("--knobs", action="store_true",
                        help="also the 2048 bench with each speed knob off")
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 8192, 16384],
                        choices=sorted(SEQ_MICRO_BATCH))
    parser.add_argument("--only", nargs="+", default=None, help="run only these stages")
    parser.add_argument("--json", default=None,
                        help="write every outcome to this file (rewritten after each stage)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run: limits cut to what is left")
    parser.add_argument("--logs", default=None, help="each stage's whole output to DIR/<stage>.log")
    parser.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.environment:
        environment()
        return 0

    import importlib.util

    import torch

    if not torch.cuda.is_available() and not args.plan:
        print("bench/gpu_acceptance.py needs a CUDA GPU and none is visible "
              "(CUDA_VISIBLE_DEVICES, driver): run it on the GPU machine, or --plan here",
              file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    te = importlib.util.find_spec("transformer_engine") is not None
    scratch = Path(tempfile.mkdtemp(prefix="danube-acceptance-"))
    stages = plan(args, scratch, peak_tflops(gpu))
    if args.only:
        stages = [s for s in stages if s.name in args.only or s.name == "environment"]
    if args.plan:
        for stage in stages:
            env = " ".join(f"{k}={v}" for k, v in stage.env.items())
            print(f"{stage.name:<28} {env + ' ' if env else ''}{' '.join(stage.command[1:])}"
                  f"{'  (with TE only)' if stage.needs_te else ''}")
        return 0
    outcomes = run_stages(stages, te, args.budget, Path(args.logs) if args.logs else None,
                          Path(args.json) if args.json else None)
    print(f"\nGPU acceptance on {gpu} ({time.strftime('%Y-%m-%d')})")
    print(f"{'stage':<32} {'result':<8} {'s':>7}  figure")
    for o in outcomes:
        print(_row(o))
    return 0 if all(o.status in ("passed", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
