"""The GPU path as far as a CPU can check it: the acceptance script's plan and refusal, the GPU
suite importing and collecting, the FLOP convention of the throughput bench, and the speed
knobs' resolution (which of them apply where)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _load_acceptance():
    """bench/gpu_acceptance.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("acceptance", ROOT / "bench/gpu_acceptance.py")
    acceptance = importlib.util.module_from_spec(spec)
    sys.modules["acceptance"] = acceptance  # its dataclasses look their module up
    spec.loader.exec_module(acceptance)
    return acceptance


def _acceptance(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/gpu_acceptance.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_acceptance_refuses_without_a_gpu_and_says_how():
    run = _acceptance()
    assert run.returncode == 2
    assert "needs a CUDA GPU" in run.stderr and "--plan" in run.stderr


def test_acceptance_plan_names_every_stage_and_each_bench_config_validates():
    """Every stage of issue 14's acceptance run is planned; each throughput/knob stage's
    configuration (danube_1.8b's architecture on the embedded data) passes validation, so
    the first GPU session does not discover a config error after starting a machine."""
    from argparse import Namespace

    from danube.config.compose import compose_pretrain_config
    from danube.config.validate import validate

    acceptance = _load_acceptance()
    stages = acceptance.plan(Namespace(skip_cpu_suite=False, seq=[2048, 8192, 16384],
                                       knobs=True), Path("/tmp/plan"), 989.0)
    names = [stage.name for stage in stages]
    # the numbers first, then the equivalence checks the first GPU run must see
    assert names[:8] == ["environment", "compile-smoke", "throughput-2048", "throughput-16384",
                         "flex-equivalence", "bf16-resume", "packed-sft", "flex-head-dim"]
    assert {"te-bf16", "te-fp8", "throughput-8192", "knob-flex-causal-16384",
            "knob-sdpa-causal-16384", "gpu-suite-rest"} <= set(names)
    assert names[-1] == "cpu-suite"
    # the GPU suite split three ways plus the rest covers it once
    parts = [s.command[s.command.index("-k") + 1] for s in stages if "tests/gpu" in s.command]
    assert parts[-1] == "not " + " and not ".join(parts[:-1])
    sys.path.insert(0, str(ROOT / "bench"))
    from throughput import architecture_overrides

    for stage in stages:
        if "bench/throughput.py" not in stage.command:
            continue
        line = " ".join(stage.command)
        overrides = [w for w in stage.command if "=" in w and w.split("=")[0].startswith(
            ("model.", "trainer."))]
        cfg = compose_pretrain_config("danube_tiny",
                                      [*architecture_overrides("danube_1.8b"), *overrides])
        assert validate(cfg) == [], line
        m = cfg.model
        window = None if "model.window_size=null" in stage.command else 4096  # causal knobs
        assert (m.hidden_size, m.num_layers, m.window_size, m.vocab_size) == (2560, 24, window,
                                                                             32000)
        assert m.micro_batch_size * m.encoder_seq_length == 16384  # the ramp's micro-batch
        assert m.global_batch_size == 4 * m.micro_batch_size  # accumulates, as a real run


def test_gpu_suite_imports_and_collects_here():
    """tests/gpu only runs on GPU machines: a broken import or a renamed helper of the CPU
    suite would otherwise surface there first. Collection imports the module."""
    env = {k: v for k, v in os.environ.items() if k != "DANUBE_GPU_TESTS"}
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                          "tests/gpu"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 0, run.stdout[-3000:]
    tests = [line for line in run.stdout.splitlines() if "::test_" in line]
    assert len(tests) >= 9, run.stdout


def test_flops_per_token_follow_the_published_convention():
    """Danube-1.8B: 11.25 GFLOP/token at 2048 and 13.14 at 16384 counted causal within the
    4096 window (../shared/notes/gpu-slurm-ngc.md A2); every key (PaLM/MPT) 12.00 and 22.57;
    Megatron-LM 0.16's count, causal over the whole sequence (seq/2 keys, the window
    ignored): 6 x dense + 6 x layers x q-projection x seq. A window covering the sequence is
    plain causal."""
    from danube.config.compose import compose_pretrain_config
    from danube.config.derived import mean_keys_per_query, training_flops_per_token

    m = compose_pretrain_config("danube_1.8b", []).model
    gflop = {s: training_flops_per_token(m, 32000, s) / 1e9 for s in (2048, 16384)}
    assert gflop[2048] == pytest.approx(11.25, abs=0.005)
    assert gflop[16384] == pytest.approx(13.14, abs=0.005)
    assert training_flops_per_token(m, 32000, 16384, attention="full") / 1e9 == \
        pytest.approx(22.57, abs=0.005)
    dense = training_flops_per_token(m, 32000, 16384, attention="full") \
        - 12 * 24 * 2560 * 16384
    for s in (2048, 16384):  # Megatron-LM: 3 x 2 x (q-projection x s / 2 x 2) per layer
        assert training_flops_per_token(m, 32000, s, attention="megatron") == pytest.approx(
            dense + 3 * 2 * 24 * (2560 * s / 2 * 2))
    assert mean_keys_per_query(2048, 4096) == mean_keys_per_query(2048, None) == 2049 / 2
    assert mean_keys_per_query(8, 2) == (1 + 2 * 7) / 8


def test_overlaps_apply_with_several_data_parallel_ranks():
    """megatron DDP's overlaps are on by default where there is something to overlap; bf16
    gradient reduction only when asked for."""
    from danube.config.schema import OptimConfig
    from danube.training.engine import ddp_config

    one = ddp_config(OptimConfig(name="distributed_fused_adam"), 1)
    assert not one.overlap_grad_reduce and not one.overlap_param_gather
    two = ddp_config(OptimConfig(name="distributed_fused_adam"), 2)
    assert two.overlap_grad_reduce and two.overlap_param_gather and two.grad_reduce_in_fp32
    plain = ddp_config(OptimConfig(), 2)
    assert plain.overlap_grad_reduce and not plain.overlap_param_gather
    off = ddp_config(OptimConfig(overlap_grad_sync=False, grad_sync_dtype="bf16"), 2)
    assert not off.overlap_grad_reduce and not off.grad_reduce_in_fp32


def test_flex_attention_is_refused_for_training_on_a_cpu():
    """FlexAttention has no backward on a CPU: preflight says so before anything starts."""
    from danube.config.compose import compose_pretrain_config
    from danube.config.preflight import Machine, preflight

    cfg = compose_pretrain_config("danube_tiny", ["model.attention_backend=flex"])
    problems = preflight(cfg, Machine(world_size=1, cuda=False, transformer_engine=False))
    assert any("attention_backend=flex" in p and "backward" in p for p in problems), problems


def test_acceptance_runner_keeps_each_result_within_its_budget(tmp_path, capsys):
    """The runner a lent GPU machine's short session depends on, with stand-in stages: each
    row printed and the JSON rewritten as a stage ends (the next stage reads it), a stage's
    limit cut to what is left of the budget (its output up to the kill kept in its log), a
    stage with no budget left not run (a failed run), one that does not apply skipped."""
    acceptance = _load_acceptance()
    acceptance.MIN_STAGE_SECONDS = 5
    py, report = sys.executable, tmp_path / "a.json"
    stages = [
        acceptance.Stage("quick", [py, "-c", "print('3 passed in 0.1s')"], 60),
        acceptance.Stage("slow", [py, "-u", "-c", "import json, time; print('rows so far', "
                                  f"len(json.load(open({str(report)!r})))); time.sleep(60)"],
                         600),
        acceptance.Stage("late", [py, "-c", "print('never')"], 60),
        acceptance.Stage("te-only", [py, "-c", "print('never')"], 60, needs_te=True),
    ]
    outcomes = acceptance.run_stages(stages, te=False, budget=8, logs=tmp_path / "logs",
                                     json_path=report)
    assert [o.status for o in outcomes] == ["passed", "timeout", "not-run", "skipped"]
    assert outcomes[0].figure == "3 passed in 0.1s"
    assert outcomes[1].seconds < 10  # cut from its own 600 s to the budget's remainder
    assert "rows so far 1" in (tmp_path / "logs" / "slow.log").read_text()
    assert [r["status"] for r in json.loads(report.read_text())] == \
        ["passed", "timeout", "not-run", "skipped"]
    out = capsys.readouterr().out
    assert out.index("quick ") < out.index("] slow ...")  # quick's row before slow starts


# What the GPU stages load: the recipes, generation, HF conversion, the GPU suite and the
# helpers it takes from the CPU suite, and the two bench scripts.
GPU_STAGE_MODULES = ["danube.training.pretrain", "danube.training.sft", "danube.training.dpo",
                     "danube.inference.generate", "danube.inference.model",
                     "danube.conversion.importer", "danube.conversion.exporter",
                     "tests.conftest", "tests.test_conversion", "tests.gpu.test_gpu"]
GPU_STAGE_SCRIPTS = ["bench/throughput.py", "bench/gpu_acceptance.py", "bench/flex_head_dim.py"]

# In a fresh interpreter: load those, then read every import statement (module level and in
# functions) of each of our files that got loaded; print {top-level name: [our files]}.
_IMPORTS = r"""
import ast, importlib, importlib.util, json, sys
from pathlib import Path
root = Path.cwd()
for name in sys.argv[1].split(","):
    importlib.import_module(name)
for path in sys.argv[2].split(","):
    spec = importlib.util.spec_from_file_location(Path(path).stem, root / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
ours = [root / d for d in ("danube", "tests", "bench")]
found = {}
for module in list(sys.modules.values()):
    path = Path(getattr(module, "__file__", None) or "/").resolve()
    if not any(path.is_relative_to(d) for d in ours) or path.suffix != ".py":
        continue
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(root)))
print(json.dumps({k: sorted(v) for k, v in found.items()}))
"""


def test_what_the_gpu_stages_import_is_on_the_gpu_machine_or_carried():
    """The lent GPU machine has torch, transformers, pytest (bench/gpu_machine_packages.txt)
    and nothing can be installed there but carried wheels (bench/gpu_wheels.sh). Every
    package our GPU-stage code imports, and every package a carried one requires, must be in
    one of the two lists, or each stage fails there at its first import (as fasteners,
    imported by danube.data.gpt, would have: every pretraining stage)."""
    import importlib.metadata as md
    import re

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    script = (ROOT / "bench/gpu_wheels.sh").read_text()
    carried = {canonicalize_name(n) for line in ("wheels", "sdists")
               for n in re.search(rf"^{line}=\((.*)\)$", script, re.M).group(1).split()}
    machine = {canonicalize_name(line.strip())
               for line in (ROOT / "bench/gpu_machine_packages.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"torch", "transformers", "pytest"} <= machine and "megatron-core" in carried

    run = subprocess.run([sys.executable, "-c", _IMPORTS, ",".join(GPU_STAGE_MODULES),
                          ",".join(GPU_STAGE_SCRIPTS)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    imported = json.loads(run.stdout.strip().splitlines()[-1])
    bench_modules = {p.stem for p in (ROOT / "bench").glob("*.py")}
    distributions = md.packages_distributions()
    needed = {}  # distribution -> who needs it
    for top, files in imported.items():
        if top in sys.stdlib_module_names or top in {"danube", "tests", "bench"} | bench_modules:
            continue
        for dist in distributions.get(top, [f"(not installed: {top})"]):
            needed.setdefault(canonicalize_name(dist), set()).update(files)
    for dist in carried:
        for line in md.requires(dist) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(
                    {"python_version": "3.12", "extra": ""}):
                needed.setdefault(canonicalize_name(requirement.name), set()).add(f"({dist})")
    missing = {d: sorted(who) for d, who in needed.items() if d not in machine | carried}
    assert not missing, f"not on the GPU machine, not carried (bench/gpu_wheels.sh): {missing}"
    assert {"megatron-core", "hydra-core", "omegaconf", "fasteners"} <= set(needed)


@pytest.mark.parametrize("peft", [False, True])
def test_every_parameter_is_created_on_megatron_s_device(megatron_world, peft):
    """megatron-core creates its weights on `torch.cuda.current_device()` (an explicit
    `device=`); everything our code adds (norms, LoRA adapters) must follow it, or on a GPU
    the first norm (or the optimizer) meets a CPU weight. Built with every explicit device
    sent to `meta` (the CPU shim's current device stands for the GPU): a parameter or buffer
    left on the CPU was created without megatron's device."""
    from danube.config.schema import LoraTuningConfig, ModelConfig, PeftConfig
    from danube.model.builder import _ForceDevice, build_model_chunks, transformer_config

    m = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                    num_query_groups=2)
    lora = PeftConfig(peft_scheme="lora", lora_tuning=LoraTuningConfig(adapter_dim=4)) if peft \
        else None
    config = transformer_config(m, "bf16", False)
    with _ForceDevice("meta"):
        chunks = build_model_chunks(m, config, 100, False, lora)
    off = [(name, t.device, t.dtype) for chunk in chunks
           for name, t in [*chunk.named_parameters(), *chunk.named_buffers()]
           if t.device.type != "meta"]
    assert off == []
    dtypes = {p.dtype for chunk in chunks for p in chunk.parameters()}
    assert dtypes == {config.params_dtype}, dtypes


def test_training_moves_the_chunks_to_the_current_cuda_device(monkeypatch):
    """As Megatron-LM's get_model: every chunk (adapters included) goes to the current CUDA
    device before Float16Module/DDP wrap it; on a CPU nothing moves."""
    import torch

    from danube.training import loop

    moved = []

    class Chunk(torch.nn.Module):
        def cuda(self, device=None):
            moved.append(device)
            return self

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    chunks = [Chunk(), Chunk()]
    assert loop.to_training_device(chunks, torch.device("cuda", 3)) == chunks
    assert moved == [3, 3]
    moved.clear()
    loop.to_training_device(chunks, torch.device("cpu"))
    assert moved == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rmsnorm_equals_transformers_and_saves_no_fp32_copy_in_bf16(dtype):
    """Our RMSNorm against transformers' LlamaRMSNorm (the formula of the models we import):
    the same output and gradients bit for bit, in fp32 and in bf16. In bf16 autograd keeps
    only the bf16 input for the norm (the backward recomputes the fp32 normalization): the
    plain composition saved an fp32 copy of the input too, 2x the activation memory of
    every norm (measured here with saved-tensor hooks)."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from danube.model.norm import RMSNorm

    dt = getattr(torch, dtype)
    h = 64
    config = TransformerConfig(num_layers=1, hidden_size=h, num_attention_heads=4,
                               params_dtype=dt, use_cpu_initialization=True)
    ours, theirs = RMSNorm(config, h, eps=1e-5), LlamaRMSNorm(h, eps=1e-5).to(dt)
    weight = torch.randn(h, generator=torch.Generator().manual_seed(0)).to(dt)
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
    x = (3 * torch.randn(5, 3, h, generator=torch.Generator().manual_seed(1))).to(dt)
    r = torch.randn(5, 3, h, generator=torch.Generator().manual_seed(2))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(xi)
        bytes_saved = sum(saved)
        (out.float() * r).sum().backward()
        results.append((out.detach(), xi.grad, module.weight.grad.clone(), bytes_saved))
    (o1, gx1, gw1, b1), (o2, gx2, gw2, b2) = results
    assert torch.equal(o1, o2) and torch.equal(gx1, gx2) and torch.equal(gw1, gw2)
    if dt == torch.bfloat16:
        n = x.numel()
        assert b1 <= 2 * (2 * n) + 2 * h + 64, (b1, b2)  # x and the normalized x, in bf16
        assert b2 >= b1 + 4 * n  # transformers' keeps an fp32 copy besides


def test_the_gpu_attention_comparison_fails_on_a_broken_mask(megatron_world):
    """tests/gpu/compare.py's rule, tried here on CPU kernels: bf16 SDPA with the right window
    passes against fp32; one key too many (window + 1) or a one-token causal leak fails. The
    rule it replaced (a mean-square loss, gradients within atol 5e-3) passed the wrong
    window: its gradients are ~1e-7."""
    import torch
    from megatron.core.transformer.enums import AttnMaskType

    from danube.config.schema import ModelConfig
    from danube.model.attention import SDPAttention
    from danube.model.builder import transformer_config
    from tests.gpu.compare import assert_attention_matches, projected_grads, projection

    seq, heads, groups, head_dim = 512, 4, 2, 80

    def attention(window):
        m = ModelConfig(num_layers=1, hidden_size=heads * head_dim, ffn_hidden_size=64,
                        num_attention_heads=heads, num_query_groups=groups,
                        window_size=window, encoder_seq_length=seq,
                        max_position_embeddings=seq)
        return SDPAttention(transformer_config(m, "bf16", False), layer_number=1,
                            attn_mask_type=AttnMaskType.causal, attention_type="self")

    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(seq, 1, h, head_dim, generator=gen) for h in (heads, groups, groups)]
    r = projection((seq, 1, heads * head_dim), "cpu")

    def run(window, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in base]
        out = attention(window)(*leaves, attention_mask=None)
        return out.detach(), projected_grads(out, leaves, r), leaves, out

    ref_out, ref_grads, _, _ = run(128, torch.float32)
    out, grads, _, _ = run(128, torch.bfloat16)
    assert_attention_matches(out, grads, ref_out, ref_grads, "right window")
    wide_out, wide_grads, leaves, wide = run(129, torch.bfloat16)
    with pytest.raises(AssertionError, match="relative error"):
        assert_attention_matches(wide_out, wide_grads, ref_out, ref_grads, "window + 1")
    # the old rule could not see it
    leaves = [t.detach().to(torch.bfloat16).requires_grad_() for t in base]
    old = [t.detach().clone().requires_grad_() for t in base]
    attention(129)(*leaves, attention_mask=None).float().square().mean().backward()
    attention(128)(*old, attention_mask=None).float().square().mean().backward()
    for a, b in zip(leaves, old):
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=5e-2, atol=5e-3)


def test_the_torch_fused_paths_compute_what_megatron_s_fallbacks_do(megatron_world):
    """Without apex/TE on a GPU the optimizer takes torch's fused AdamW and foreach norm and
    scale (engine.use_torch_fused_paths) instead of megatron's per-tensor Python loops (one
    host sync per parameter in every clipped step). Same results: the gradient norm and the
    scaled gradients as megatron's fallbacks compute them, and one fused AdamW step as the
    unfused one (to fp32 rounding; torch's fused AdamW runs on the CPU too)."""
    import torch
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    from danube.training.engine import _foreach_l2_norm, _foreach_scale

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=gen) for n in (7, 300, 4096)]
    ours, _ = _foreach_l2_norm(2048, None, [grads], False)
    theirs, _ = local_multi_tensor_l2_norm(2048, None, [grads], False)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    a, b = [torch.empty_like(g) for g in grads], [torch.empty_like(g) for g in grads]
    _foreach_scale(2048, None, [grads, a], 0.37)
    local_multi_tensor_scale(2048, None, [grads, b], 0.37)
    assert all(torch.equal(x, y) for x, y in zip(a, b))

    params = [[torch.nn.Parameter(torch.randn(64, 32, generator=gen)) for _ in range(3)]
              for _ in range(2)]
    for p, q in zip(*params):
        q.data.copy_(p.data)
        p.grad = torch.randn(64, 32, generator=gen)
        q.grad = p.grad.clone()
    plain = torch.optim.AdamW(params[0], lr=1e-2, weight_decay=0.1)
    fused = torch.optim.AdamW(params[1], lr=1e-2, weight_decay=0.1)
    for group in fused.param_groups:  # what use_torch_fused_paths sets after construction
        group["fused"], group["foreach"] = True, False
    for _ in range(3):
        plain.step()
        fused.step()
    for p, q in zip(*params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_timed_out_stage_is_killed_with_its_children(tmp_path):
    """A stage's limit ends its whole process group: a pytest or bench worker that spawned
    children (launches, compile workers) must not keep the GPU busy into the next stage."""
    import time

    acceptance = _load_acceptance()
    pid_file = tmp_path / "child.pid"
    parent = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(120)")
    stage = acceptance.Stage("spawner", [sys.executable, "-c", parent], 3)
    outcome = acceptance.run_stage(stage, te=False)
    assert outcome.status == "timeout"
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the stage's child outlived its limit")
