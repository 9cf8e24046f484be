"""Sliding-window attention equals a hand-written reference with HF's `sliding_window`
meaning (each query sees W keys, itself included), for our SDPA backend and for
megatron-core's own DotProductAttention under our (W-1, 0) mapping."""

from __future__ import annotations

import math

import pytest
import torch

from danube.config.schema import ModelConfig
from danube.model.builder import megatron_window, transformer_config

SEQ, BATCH, HEADS, GROUPS, HEAD_DIM, WINDOW = 40, 2, 8, 2, 16, 8


def reference_attention(q, k, v, window):
    """q [s, b, h, d], k/v [s, b, g, d] -> [s, b, h*d]. Query i attends key j iff
    j <= i and i - j < window (HF Mistral's sliding_window); window None = causal."""
    s, b, h, d = q.shape
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    v = v.repeat_interleave(h // v.shape[2], dim=2)
    scores = torch.einsum("ibhd,jbhd->bhij", q.double(), k.double()) / math.sqrt(d)
    i = torch.arange(s).unsqueeze(1)
    j = torch.arange(s).unsqueeze(0)
    allowed = (j <= i) if window is None else (j <= i) & (i - j < window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhij,jbhd->ibhd", scores.softmax(-1), v.double())
    return out.reshape(s, b, h * d).float()


def _config(window, seq=SEQ):
    model = ModelConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, ffn_hidden_size=64,
                        num_attention_heads=HEADS, num_query_groups=GROUPS, window_size=window,
                        encoder_seq_length=seq, max_position_embeddings=max(seq, window or 0))
    return transformer_config(model, "32", use_te=False)


def _qkv(seed=0, seq=SEQ, batch=BATCH):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, batch, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(seq, batch, GROUPS, HEAD_DIM, generator=gen)
    v = torch.randn(seq, batch, GROUPS, HEAD_DIM, generator=gen)
    return q, k, v


def _attention(backend, window, seq=SEQ):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from danube.model.attention import FlexAttention, SDPAttention

    cls = {"sdpa": SDPAttention, "flex": FlexAttention, "local": DotProductAttention}[backend]
    return cls(_config(window, seq), layer_number=1, attn_mask_type=AttnMaskType.causal,
               attention_type="self")


def test_window_mapping_is_hf_minus_one():
    assert megatron_window(4096) == (4095, 0)
    assert megatron_window(None) is None


@pytest.mark.parametrize("backend", ["sdpa", "local"])
@pytest.mark.parametrize("window", [WINDOW, None])
def test_attention_matches_reference(megatron_world, backend, window):
    q, k, v = _qkv()
    out = _attention(backend, window)(q, k, v, attention_mask=None)
    torch.testing.assert_close(out, reference_attention(q, k, v, window), rtol=1e-5, atol=1e-5)


def test_window_is_really_applied(megatron_world):
    q, k, v = _qkv(1)
    windowed = _attention("sdpa", WINDOW)(q, k, v, attention_mask=None)
    causal = reference_attention(q, k, v, None)
    # Queries inside the first window see the same keys either way; later ones do not.
    torch.testing.assert_close(windowed[:WINDOW], causal[:WINDOW], rtol=1e-5, atol=1e-5)
    assert (windowed[WINDOW:] - causal[WINDOW:]).abs().max() > 1e-2


def test_off_by_one_window_would_be_caught(megatron_world):
    """Megatron's tuple is inclusive: passing HF's W unchanged lets each query see W+1 keys."""
    q, k, v = _qkv(2)
    wrong = _attention("sdpa", WINDOW + 1)(q, k, v, attention_mask=None)  # (W, 0) in megatron
    assert (wrong - reference_attention(q, k, v, WINDOW)).abs().max() > 1e-2


def test_padding_mask_is_combined_with_the_window(megatron_world):
    """megatron's local attention drops the mask when a window is set; ours keeps both."""
    q, k, v = _qkv(3)
    masked = torch.zeros(BATCH, 1, SEQ, SEQ, dtype=torch.bool)
    masked[..., :, 5] = True  # nobody may attend key 5
    out = _attention("sdpa", WINDOW)(q, k, v, attention_mask=masked)
    k2, v2 = k.clone(), v.clone()
    k2[5], v2[5] = 0.0, 0.0  # perturbing key 5 must not change anything
    out2 = _attention("sdpa", WINDOW)(q, k2, v2, attention_mask=masked)
    torch.testing.assert_close(out, out2)
    assert (out - _attention("sdpa", WINDOW)(q, k, v, attention_mask=None)).abs().max() > 1e-3


def test_backend_choices_are_made_in_one_place():
    """TE layers use TE's attention unless sdpa/flex/local is asked for; without TE, auto is
    FlexAttention on a GPU (SDPA with attention dropout, which Flex lacks) and SDPA on a CPU;
    each fusion only where its kernel runs; batched p2p only with CUDA."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from danube.config.schema import ModelConfig
    from danube.model.attention import FlexAttention, SDPAttention
    from danube.model.builder import backend

    def model(attention="auto", **extra):
        return ModelConfig(attention_backend=attention, **extra)

    te_auto = backend(model(), use_te=True, cuda=True)
    assert (te_auto.te_layers, te_auto.core_attention, te_auto.fusions) == (True, None, True)
    assert backend(model("sdpa"), use_te=True).core_attention is SDPAttention
    assert backend(model("flex"), use_te=True).core_attention is FlexAttention
    local = backend(model(), use_te=False)
    assert (local.te_layers, local.core_attention, local.fusions) == (False, SDPAttention, False)
    assert backend(model("local"), use_te=False).core_attention is DotProductAttention
    assert local.batch_p2p is False  # this CPU suite hides CUDA
    assert not (local.activation_fusion or local.cross_entropy_fusion
                or local.grad_accumulation_fusion)
    gpu = backend(model(), use_te=False, cuda=True)
    assert gpu.core_attention is FlexAttention and gpu.batch_p2p
    assert gpu.activation_fusion and gpu.cross_entropy_fusion  # bias-free SwiGLU fuses too
    assert not gpu.grad_accumulation_fusion  # TE's (and apex's) kernel: absent here
    assert backend(model(attention_dropout=0.1), use_te=False, cuda=True).core_attention \
        is SDPAttention
    off = backend(model(bias_activation_fusion=False, cross_entropy_loss_fusion=False),
                  use_te=False, cuda=True)
    assert not (off.activation_fusion or off.cross_entropy_fusion)
    assert not backend(model(cross_entropy_fusion_impl="te"), use_te=False,
                       cuda=True).cross_entropy_fusion  # TE's kernel without TE
    assert not backend(model(activation="gelu"), use_te=False, cuda=True).activation_fusion


@pytest.mark.parametrize("window", [WINDOW, None])
def test_decode_step_attends_like_the_last_rows_of_full_attention(megatron_world, window):
    """megatron's inference engine passes `no_mask` once the prompt is in the KV cache: the
    new queries are the last of the keys (bottom-right causal, narrowed by the window)."""
    from megatron.core.transformer.enums import AttnMaskType

    q, k, v = _qkv(4)
    full = reference_attention(q, k, v, window)
    attention = _attention("sdpa", window)
    for new in (1, 3):  # one decode step; a few tokens at once
        out = attention(q[-new:], k, v, attention_mask=None, attn_mask_type=AttnMaskType.no_mask)
        torch.testing.assert_close(out, full[-new:], rtol=1e-5, atol=1e-5)


# FlexAttention (the GPU path without TE) runs its forward on a CPU too, uncompiled: the same
# numbers as the reference. Lengths are whole 128-token blocks (shorter ones go to SDPA).
FLEX_SEQ = 256


@pytest.mark.parametrize("window", [48, 200, FLEX_SEQ, None])
def test_flex_attention_matches_reference(megatron_world, window):
    """Windows shorter than a block, spanning blocks, covering the sequence (plain causal
    SDPA then), and none; GQA (8 query heads on 2 groups)."""
    q, k, v = _qkv(5, seq=FLEX_SEQ)
    out = _attention("flex", window, FLEX_SEQ)(q, k, v, attention_mask=None)
    torch.testing.assert_close(out, reference_attention(q, k, v, window), rtol=1e-5, atol=1e-5)


def test_flex_block_mask_skips_the_blocks_outside_the_window():
    """At 1024 tokens with a 128-token window a query block sees at most 2 key blocks of 8:
    most of causal attention's work is never done (and the cache serves each ramp stage)."""
    from danube.model.attention import window_block_mask

    windowed = window_block_mask(1024, 127, "cpu")
    causal = window_block_mask(1024, 1023, "cpu")
    assert windowed.sparsity() > 70 and causal.sparsity() < 50
    assert window_block_mask(1024, 127, "cpu") is windowed


def _documents_reference(q, k, v, lengths, window):
    """Per-document reference on [t, 1, ...] tensors: each document alone, positions from 0."""
    out, start = [], 0
    for n in lengths:
        part = slice(start, start + n)
        out.append(reference_attention(q[part], k[part], v[part], window))
        start += n
    return torch.cat(out)  # [t, 1, h*d]


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("window", [48, None])
def test_packed_documents_attend_only_to_themselves(megatron_world, backend, window):
    """megatron's THD layout (q/k/v [t, heads, d], cu_seqlens): what packed SFT/DPO batches
    use on every backend. Each document's output equals it run alone."""
    from megatron.core.packed_seq_params import PackedSeqParams

    lengths = [100, 37, 91, 28]  # two rows of 128: documents, then each row's padding tail
    q, k, v = _qkv(6, seq=sum(lengths), batch=1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    attention = _attention(backend, window, sum(lengths))
    out = attention(q.squeeze(1), k.squeeze(1), v.squeeze(1), attention_mask=None,
                    packed_seq_params=packed)  # [t, h*d]
    expected = _documents_reference(q, k, v, lengths, window).squeeze(1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # Without the document boundaries the second document would see the first.
    whole = reference_attention(q, k, v, window).squeeze(1)
    assert (whole[100:137] - expected[100:137]).abs().max() > 1e-2


def test_flex_attention_refuses_dropout(megatron_world):
    from megatron.core.transformer.enums import AttnMaskType

    from danube.model.attention import FlexAttention

    config = _config(None)
    config.attention_dropout = 0.1
    with pytest.raises(ValueError, match="attention_dropout"):
        FlexAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                      attention_type="self")
