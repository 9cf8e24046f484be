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


def _config(window):
    model = ModelConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, ffn_hidden_size=64,
                        num_attention_heads=HEADS, num_query_groups=GROUPS, window_size=window,
                        encoder_seq_length=SEQ, max_position_embeddings=SEQ)
    return transformer_config(model, "32", use_te=False)


def _qkv(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(SEQ, BATCH, GROUPS, HEAD_DIM, generator=gen)
    v = torch.randn(SEQ, BATCH, GROUPS, HEAD_DIM, generator=gen)
    return q, k, v


def _attention(backend, window):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from danube.model.attention import SDPAttention

    cls = SDPAttention if backend == "sdpa" else DotProductAttention
    return cls(_config(window), layer_number=1, attn_mask_type=AttnMaskType.causal,
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
    """TE layers use TE's attention unless sdpa/local is asked for; without TE, our SDPA (or
    megatron's DotProductAttention) and no fused kernels; batched p2p only with CUDA."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from danube.config.schema import ModelConfig
    from danube.model.attention import SDPAttention
    from danube.model.builder import backend

    def model(attention):
        return ModelConfig(attention_backend=attention)

    te_auto = backend(model("auto"), use_te=True)
    assert (te_auto.te_layers, te_auto.core_attention, te_auto.fusions) == (True, None, True)
    assert backend(model("sdpa"), use_te=True).core_attention is SDPAttention
    local = backend(model("auto"), use_te=False)
    assert (local.te_layers, local.core_attention, local.fusions) == (False, SDPAttention, False)
    assert backend(model("local"), use_te=False).core_attention is DotProductAttention
    assert local.batch_p2p is False  # this CPU suite hides CUDA


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
