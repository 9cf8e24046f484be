"""The GPU suite: what the CPU suite cannot show. Run on a CUDA machine with

    DANUBE_GPU_TESTS=1 python -m pytest -m gpu tests/gpu

(bench/gpu_acceptance.py does, among its other checks). Without CUDA every test here is
skipped: the CPU suite hides the GPUs unless DANUBE_GPU_TESTS=1 (tests/conftest.py).

Tolerances: bf16 runs are compared within bf16 rounding, never bit for bit across different
kernels; a resume is compared with the run it continues, on the same kernels.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.conftest import QUIET, SMALL_MODEL, run_pretrain, run_sft, train_records
from tests.gpu.compare import assert_attention_matches, projected_grads, projection

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (DANUBE_GPU_TESTS=1 on a GPU machine)"),
]

# Blocks of 128 tokens so FlexAttention (the GPU path without TE) runs, a window inside them.
GPU_MODEL = [*[a for a in SMALL_MODEL if "seq_length" not in a and "position_emb" not in a],
             "model.encoder_seq_length=128", "model.max_position_embeddings=128"]


@pytest.fixture(scope="module")
def cuda_world():
    """torch.distributed on NCCL (one process) + megatron parallel state, in this process."""
    from danube.config.schema import ModelConfig
    from danube.training.distributed import init_distributed, shutdown

    init_distributed(ModelConfig(), "gpu")
    yield
    shutdown()


def _attention(cls_name: str, window, seq: int, heads=32, groups=8, head_dim=80):
    """Danube-1.8B's head layout (32 x 80, 8 groups): head_dim 80 is not a power of two."""
    from megatron.core.transformer.enums import AttnMaskType

    from danube.config.schema import ModelConfig
    from danube.model import attention
    from danube.model.builder import transformer_config

    m = ModelConfig(num_layers=1, hidden_size=heads * head_dim, ffn_hidden_size=64,
                    num_attention_heads=heads, num_query_groups=groups, window_size=window,
                    encoder_seq_length=seq, max_position_embeddings=seq)
    config = transformer_config(m, "bf16-mixed", use_te=False)
    return getattr(attention, cls_name)(config, layer_number=1,
                                        attn_mask_type=AttnMaskType.causal,
                                        attention_type="self")


def _qkv(seq, batch, heads=32, groups=8, head_dim=80, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(h):
        return torch.randn(seq, batch, h, head_dim, generator=gen, device="cuda",
                           dtype=torch.bfloat16, requires_grad=True)

    return rand(heads), rand(groups), rand(groups)


def _reference(q, k, v, window, packed=None):
    """SDPA in fp32 on the same (bf16) inputs: the truth both kernels are judged against."""
    sdpa = _attention("SDPAttention", window, q.shape[0])
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    kwargs = {"packed_seq_params": packed} if packed is not None else {}
    return leaves, sdpa(*leaves, attention_mask=None, **kwargs)


def _check(name, window, q, k, v, r, packed=None, flex_window="same"):
    """FlexAttention (bf16) vs the fp32 reference, by compare.py's rule."""
    flex = _attention("FlexAttention", window if flex_window == "same" else flex_window,
                      q.shape[0])
    kwargs = {"packed_seq_params": packed} if packed is not None else {}
    out = flex(q, k, v, attention_mask=None, **kwargs)
    grads = projected_grads(out, (q, k, v), r)
    leaves, ref = _reference(q, k, v, window, packed)
    ref_grads = projected_grads(ref, leaves, r)
    assert_attention_matches(out, grads, ref, ref_grads, name)


@pytest.mark.parametrize("window", [512, None])
def test_flex_attention_equals_sdpa_forward_and_backward(cuda_world, window):
    """Compiled FlexAttention vs SDPA in fp32 with a dense window mask, at 2048 tokens
    (window 512: most blocks skipped): output and the q, k, v gradients of a random
    projection within 1.5 bf16 epsilons (relative). The same check must fail for a Flex
    mask one key too wide: the comparison can see a wrong mask."""
    q, k, v = _qkv(2048, 2)
    r = projection((2048, 2, 32 * 80), "cuda")
    _check(f"flex window {window}", window, q, k, v, r)
    if window is not None:
        with pytest.raises(AssertionError, match="relative error"):
            _check("flex window one key too wide", window, q, k, v, r,
                   flex_window=window + 1)


def test_flex_packed_documents_equal_sdpa_block_diagonal(cuda_world):
    """THD (packed documents): FlexAttention's document block mask vs SDPA's per-document
    attention in fp32, forward and backward, by the same rule."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = [700, 300, 1024, 24]  # 2048 tokens, one document crossing a 1024 row edge
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                      device="cuda")
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    q, k, v = (t.detach().squeeze(1).requires_grad_() for t in _qkv(2048, 1, seed=1))
    r = projection((2048, 32 * 80), "cuda")
    _check("flex packed", 256, q, k, v, r, packed)


def _gpu_run(tmp_path, name, steps, extra=()):
    return [*GPU_MODEL, *QUIET, "trainer.accelerator=gpu", "trainer.precision=bf16-mixed",
            f"trainer.max_steps={steps}", "model.optim.sched.max_steps=8",
            "model.optim.sched.warmup_steps=2", f"exp_manager.exp_dir={tmp_path}",
            f"exp_manager.name={name}",
            "exp_manager.checkpoint_callback_params.every_n_train_steps=3",
            "exp_manager.checkpoint_callback_params.save_top_k=5", *extra]


def test_bf16_resume_equals_straight_on_gpu(tmp_path):
    """danube_tiny (small) on one GPU, bf16, NCCL, CUDA RNG: a run resumed from the straight
    run's step-3 checkpoint gives the straight run's losses and gradient norms."""
    run_pretrain(_gpu_run(tmp_path, "straight", 8))
    checkpoints = tmp_path / "resumed" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_00000003",
                    checkpoints / "step_00000003")
    run = run_pretrain(_gpu_run(tmp_path, "resumed", 8))
    assert "(step 3)" in run.stdout
    straight, resumed = train_records(tmp_path / "straight"), train_records(tmp_path / "resumed")
    assert list(resumed) == [4, 5, 6, 7, 8]
    for step in resumed:
        for key in ("loss", "grad_norm"):
            assert resumed[step][key] == pytest.approx(straight[step][key], rel=1e-3), (step, key)


def test_two_layer_1p8b_distributed_optimizer_saves_and_resumes(tmp_path):
    """Danube-1.8B's layer shapes (2 of its 24 layers, vocabulary 32000) with the distributed
    optimizer at 2048 tokens: saved at step 2 in the background (async_save, as
    danube_1.8b.yaml does: staged from GPU memory, a forked writer), resumed to 4, the same
    losses."""
    from bench.throughput import architecture_overrides

    arch = [a for a in architecture_overrides("danube_1.8b") if "num_layers" not in a]
    extra = [*arch, "model.num_layers=2", "model.encoder_seq_length=2048",
             "model.micro_batch_size=2", "model.global_batch_size=4",
             "model.optim.name=distributed_fused_adam", "model.optim.lr=3e-4"]

    def args(name):
        return [*QUIET, "trainer.accelerator=gpu", "trainer.precision=bf16-mixed",
                "trainer.max_steps=4", "model.optim.sched.max_steps=4",
                "model.optim.sched.warmup_steps=1", f"exp_manager.exp_dir={tmp_path}",
                f"exp_manager.name={name}",
                "exp_manager.checkpoint_callback_params.every_n_train_steps=2", *extra]

    run_pretrain([*args("straight"), "exp_manager.checkpoint_callback_params.async_save=true"])
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_00000002",
                    tmp_path / "resumed" / "checkpoints" / "step_00000002")
    run_pretrain(args("resumed"))
    straight, resumed = train_records(tmp_path / "straight"), train_records(tmp_path / "resumed")
    assert list(resumed) == [3, 4]
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-3), step


def test_an_hf_import_loads_and_trains_on_gpu(tmp_path):
    """An imported HF Mistral (conversion/hf_to_mcore.py) on the GPU: its logits equal the
    HF model's (fp32), and pretraining continues from it (`restore_from_path`, the import's
    own config.yaml) on the GPU."""
    from danube.inference.model import open_checkpoint
    from tests.test_conversion import convert, hf_logits, make_hf, write_imported_corpus

    hf = make_hf(tmp_path / "hf", "mistral")
    convert("hf_to_mcore.py", hf, tmp_path / "ours")
    tokens = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with open_checkpoint(tmp_path / "ours" / "checkpoint", "32", accelerator="gpu") as model:
        ours = model.logits(tokens).float().cpu()
    expected = hf_logits(hf, tokens)
    torch.testing.assert_close(ours[..., :expected.shape[-1]], expected, rtol=1e-4, atol=1e-4)
    write_imported_corpus(tmp_path / "ours", tmp_path / "text")
    run = run_pretrain([
        "--config-path", str(tmp_path / "ours"), "--config-name", "config",
        f"model.data.data_prefix=[{tmp_path / 'text'}]", "model.encoder_seq_length=32",
        "model.micro_batch_size=2", "model.global_batch_size=4", "trainer.max_steps=2",
        "trainer.accelerator=gpu", "model.optim.sched.warmup_steps=1", *QUIET,
        f"exp_manager.exp_dir={tmp_path / 'runs'}"])
    assert "initialised weights from" in run.stdout and "step 2/2" in run.stdout


def test_packed_sft_equals_unpacked_on_gpu(tmp_path):
    """SFT packed (THD: FlexAttention's document mask, or TE's fused THD attention when TE is
    present) vs one conversation per row: the same losses within bf16 rounding."""
    init = tmp_path / "init"
    run_pretrain([*GPU_MODEL, *QUIET, "trainer.accelerator=gpu", "trainer.max_steps=0",
                  "model.optim.sched.max_steps=10", "model.optim.sched.warmup_steps=2",
                  f"exp_manager.exp_dir={init}", "exp_manager.name=init"])
    start = init / "init" / "checkpoints" / "step_00000000"
    records = {}
    for packed in (False, True):
        name = f"packed_{packed}".lower()
        run_sft([f"model.restore_from_path={start}", "model.encoder_seq_length=128",
                 "model.global_batch_size=8", "model.micro_batch_size=4",
                 "trainer.max_epochs=null", "trainer.max_steps=4", *QUIET,
                 "model.optim.sched.warmup_steps=1", "model.optim.sched.max_steps=10",
                 "trainer.accelerator=gpu", "trainer.precision=bf16-mixed",
                 f"model.data.train_ds.packed_sequence={str(packed).lower()}",
                 f"exp_manager.exp_dir={tmp_path}", f"exp_manager.name={name}"])
        records[packed] = train_records(tmp_path / name)
    assert list(records[True]) == [1, 2, 3, 4]
    for step, ref in records[False].items():
        assert records[True][step]["loss"] == pytest.approx(ref["loss"], rel=2e-2), step


def test_kv_cached_generation_equals_recompute_on_gpu(tmp_path):
    """megatron's static engine on the GPU (prefill and KV-cached decode through our
    attention) gives the tokens of a full forward per token, past the 48-token window."""
    from danube.inference.generate import Sampling, generate
    from danube.inference.model import open_checkpoint

    run_pretrain([*SMALL_MODEL, *QUIET, "trainer.accelerator=gpu", "trainer.max_steps=3",
                  "model.optim.sched.warmup_steps=1", f"exp_manager.exp_dir={tmp_path}",
                  "exp_manager.name=gen"])
    with open_checkpoint(tmp_path / "gen", "32", accelerator="gpu") as model:
        prompt = model.tokenizer.tokenize("def f(x):")
        steps = 60 - len(prompt)
        cached = generate(model, [prompt], Sampling(max_new_tokens=steps))[0].tokens
        ids = list(prompt)
        for _ in range(len(cached)):
            ids.append(int(model.logits(torch.tensor([ids]))[0, -1].argmax()))
        assert cached == ids[len(prompt):]
        assert len(prompt) + len(cached) > 48 or cached[-1] == model.tokenizer.eod


def test_bench_runs_a_step_on_gpu(tmp_path):
    """bench/throughput.py's danube worker on the GPU: a finite loss and a device peak."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "bench/throughput.py", "--worker", "danube-bf16",
                          "--steps", "2", "--warmup", "1", *GPU_MODEL],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**__import__("os").environ, "BENCH_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["device"] == "cuda" and result["peak_mib"] > 0
    assert result["loss"] == result["loss"]
