"""GPU acceptance: what to run on a GPU machine before a long job, and on any GPU we get.

    python bench/gpu_acceptance.py                 # everything, ~15-20 min on one H100/H200
    python bench/gpu_acceptance.py --plan          # the stages and their commands; runs nothing

On a machine lent for minutes (9 for one command), bound the whole run and keep what each
stage printed:

    python bench/gpu_acceptance.py --skip-cpu-suite --budget 540 --logs $OUT --json $OUT/a.json

The order puts the numbers first: each stage's limit is cut to what is left of --budget, a
stage with under 30 s left is not run (the run then exits 1), each stage's row is printed as
it ends and --json is rewritten after each one; --logs keeps every stage's whole output. Each
stage runs in its own process group, killed whole at its limit (a timed-out pytest or bench
worker never holds the GPU into the next stage). A run killed from outside still leaves what
it had measured.

Stages, in order:
  environment     GPU, CUDA, torch, Triton, megatron-core, Transformer Engine, apex
  compile-smoke   a one-second torch.compile on the GPU (Triton needs a C compiler and
                  Python's headers on the machine: FlexAttention compiles the same way)
  throughput-2048, throughput-16384   the two targets: bench/throughput.py, danube_1.8b's
                  architecture, bf16, no TE, 4 micro-batches accumulated per step, fused AdamW
  flex-equivalence  FlexAttention == SDPA in fp32 (forward, backward, packed; tests/gpu)
  bf16-resume     bf16 resume == straight on NCCL/CUDA RNG (tests/gpu)
  packed-sft      packed SFT == unpacked (tests/gpu)
  flex-head-dim   FlexAttention at head dim 80 vs 128 at equal FLOPs (bench/flex_head_dim.py)
  knob-*          (--knobs) one speed knob at a time: Flex vs causal SDPA at 16384 without
                  the window (equal FLOPs), SwiGLU fusion off, cross-entropy fusion off
  gpu-suite-rest  the rest of tests/gpu (2-layer danube_1.8b with the distributed optimizer,
                  HF import, KV-cached generation, the bench worker)
  te-bf16/te-fp8  with Transformer Engine only: the TE layer spec without and with FP8
  throughput-8192 (when listed in --seq)
  cpu-suite       the CPU test suite on this host (unless --skip-cpu-suite)
Exit status 0 when every stage passed. Targets (one H100, bf16, no TE): >= 40K tokens/s/GPU
at 2048; 16384 with the window >= 0.8x that; micro-batch 8 x 2048 fits 80 GB. The figures
belong in docs/benchmarks.md with the GPU named.
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
# Micro-batches accumulated per optimizer step in the throughput stages (the 1.8B run
# accumulates 9 on 8 GPUs; stepping at every micro-batch is pessimistic and unlike it).
ACCUMULATE = 4
# Each knob as (sequence length, overrides); with --knobs. Flex against causal SDPA needs the
# window off (at 2048 a 4096 window covers the sequence: Flex would not even run, and SDPA
# with a dense s x s window mask loses the flash kernel): equal FLOPs, both plain causal.
# Gradient-accumulation fusion is not a knob without Transformer Engine (megatron needs
# apex's fused_weight_gradient_mlp_cuda for it; the builder turns it off): not measured.
KNOBS = {
    "flex-causal-16384": (16384, ["model.window_size=null"]),
    "sdpa-causal-16384": (16384, ["model.window_size=null", "model.attention_backend=sdpa"]),
    "swiglu-fusion-off": (2048, ["model.bias_activation_fusion=false"]),
    "cross-entropy-fusion-off": (2048, ["model.cross_entropy_loss_fusion=false"]),
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
           "--engines", "danube-bf16", "--rounds", "1", "--steps", str(steps), "--warmup", "2",
           "--json", str(out), "trainer.accelerator=gpu", "model.transformer_engine=false",
           f"model.encoder_seq_length={seq}", f"model.micro_batch_size={mbs}",
           f"model.global_batch_size={ACCUMULATE * mbs}", *extra]
    return cmd + (["--peak-tflops", str(peak)] if peak else [])


FIRST_TARGETS = (2048, 16384)
GPU_SUITE_PARTS = {"flex-equivalence": "flex", "bf16-resume": "bf16_resume",
                   "packed-sft": "packed_sft"}


def plan(args, scratch: Path, peak: Optional[float]) -> List[Stage]:
    """The stages, the numbers first (see the module docstring)."""
    py = sys.executable
    gpu_env = {"DANUBE_GPU_TESTS": "1"}
    suite = [py, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu"]
    stages = [Stage("environment", [py, __file__, "--environment"], 120),
              Stage("compile-smoke", [py, __file__, "--compile-smoke"], 180)]
    for seq in [s for s in FIRST_TARGETS if s in args.seq]:
        stages.append(Stage(f"throughput-{seq}",
                            throughput_command(seq, peak, scratch / f"throughput-{seq}.json"),
                            420))
    for name, keyword in GPU_SUITE_PARTS.items():
        stages.append(Stage(name, [*suite, "-k", keyword], 300, gpu_env))
    stages.append(Stage("flex-head-dim", [py, "bench/flex_head_dim.py", "--json",
                                          str(scratch / "flex-head-dim.json")], 240))
    if args.knobs:
        for knob, (seq, extra) in KNOBS.items():
            stages.append(Stage(f"knob-{knob}", throughput_command(
                seq, peak, scratch / f"knob-{knob}.json", extra), 420))
    rest = " and ".join(f"not {k}" for k in GPU_SUITE_PARTS.values())
    stages.append(Stage("gpu-suite-rest", [*suite, "-k", rest], 900, gpu_env))
    tiny = [py, "launchers/pretrain.py", "trainer.accelerator=gpu", "trainer.max_steps=20",
            "trainer.limit_val_batches=0", "trainer.limit_test_batches=0",
            "exp_manager.resume_if_exists=false", "exp_manager.create_tensorboard_logger=false"]
    for fp8 in (False, True):
        name = "te-fp8" if fp8 else "te-bf16"
        stages.append(Stage(name, [*tiny, f"exp_manager.exp_dir={scratch / name}",
                                   f"model.fp8={str(fp8).lower()}",
                                   "model.transformer_engine=true"], 600, needs_te=True))
    for seq in [s for s in args.seq if s not in FIRST_TARGETS]:
        stages.append(Stage(f"throughput-{seq}",
                            throughput_command(seq, peak, scratch / f"throughput-{seq}.json"),
                            420))
    if not args.skip_cpu_suite:
        stages.append(Stage("cpu-suite", [py, "-m", "pytest", "-q", "-x", "tests",
                                          "--ignore=tests/gpu"], 1500))
    return stages


def compile_smoke() -> None:
    """torch.compile of a small function on the GPU: Triton compiles a kernel with the
    machine's C compiler against Python's headers, as FlexAttention's first call will."""
    import torch

    start = time.perf_counter()
    f = torch.compile(lambda x: torch.sin(x) * 2 + 1)
    x = torch.randn(1024, device="cuda")
    ok = torch.allclose(f(x), torch.sin(x) * 2 + 1)
    print(json.dumps({"compiled": bool(ok), "seconds": time.perf_counter() - start}))
    if not ok:
        raise SystemExit("torch.compile gave a wrong result")


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
    if stage.name == "compile-smoke":
        facts = json.loads(stdout.strip().splitlines()[-1])
        return f"torch.compile ok in {facts['seconds']:.1f} s", facts
    if stage.name == "flex-head-dim":
        lines = [line for line in stdout.splitlines() if line.startswith("head dim 80")]
        return (lines[-1] if lines else ""), None
    json_arg = stage.command[stage.command.index("--json") + 1] if "--json" in stage.command \
        else None
    if json_arg and Path(json_arg).is_file():
        r = json.loads(Path(json_arg).read_text())[0]
        return (f"{r['tokens_per_s']:,.0f} tok/s/GPU, MFU {r['mfu']} (Megatron-LM "
                f"{r['mfu_megatron']}, every key {r['mfu_full']}), peak "
                f"{r['peak_mib'] / 1024:.1f} GiB ({r['reserved_mib'] / 1024:.1f} reserved)"), r
    lines = [line for line in stdout.splitlines() if " passed" in line or " failed" in line]
    return (lines[-1].strip("= ") if lines else ""), None


# A stage left with less than this of the budget is skipped rather than started to be killed.
MIN_STAGE_SECONDS = 30


def run_stage(stage: Stage, te: bool, timeout: Optional[float] = None,
              logs: Optional[Path] = None) -> Outcome:
    """One stage in its own process, limited to `timeout` (default the stage's own); its
    whole output goes to <logs>/<stage>.log when `logs` is given."""
    if stage.needs_te and not te:
        return Outcome(stage, "skipped", 0.0, "Transformer Engine not installed")
    limit = stage.timeout if timeout is None else timeout
    start = time.perf_counter()
    # its own session: at the limit the whole group goes (pytest's launches, bench workers,
    # compile workers), not only the direct child
    proc = subprocess.Popen(stage.command, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **stage.env})
    out = proc
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        stdout, stderr = proc.communicate()
        out = None
    _kill_group(proc.pid)  # whatever it left running
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


def _kill_group(pgid: int) -> None:
    import signal

    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 16384, 8192],
                        choices=sorted(SEQ_MICRO_BATCH))
    parser.add_argument("--only", nargs="+", default=None, help="run only these stages")
    parser.add_argument("--json", default=None,
                        help="write every outcome to this file (rewritten after each stage)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run: limits cut to what is left")
    parser.add_argument("--logs", default=None, help="each stage's whole output to DIR/<stage>.log")
    parser.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile-smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.environment:
        environment()
        return 0
    if args.compile_smoke:
        compile_smoke()
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
