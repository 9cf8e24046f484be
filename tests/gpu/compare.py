"""How the GPU suite compares a bf16 result with its reference, so that a wrong kernel fails.

A loss of `out ** 2` averaged over ~10M elements gives gradients of ~1e-7, far under any
absolute tolerance: a mask that lets one extra key through passed. Here the loss is a fixed
random projection of the output, `(out.float() * r).sum()`, whose gradient is `r` pulled back
through the attention (order 1 everywhere), and tensors are compared by their relative
Frobenius error, judged against bf16's machine epsilon.

Measured on CPU (SDPA, 1024 tokens, 4 heads of 80, window 512, against fp32): a correct bf16
run is 0.0034 off in the output and 0.0040-0.0048 in the gradients; a window one key too wide
0.019-0.021; one key too narrow at the edge of 16 0.07-0.08; a causal leak of one token
0.23-0.33 (tests/test_gpu_path.py checks the verdicts on CPU)."""

from __future__ import annotations

from typing import Sequence

import torch

BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7
TOLERANCE = 1.5 * BF16_EPS  # relative Frobenius error of a bf16 result vs its fp32 reference


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return float((actual.float() - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_bf16_close(actual: torch.Tensor, expected: torch.Tensor, what: str,
                      tolerance: float = TOLERANCE) -> None:
    error = relative_error(actual, expected)
    assert error <= tolerance, (f"{what}: relative error {error:.4f} > {tolerance:.4f} "
                                f"({tolerance / BF16_EPS:.1f} x bf16 epsilon)")


def projection(shape, device, seed: int = 1234) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)


def projected_grads(out: torch.Tensor, tensors: Sequence[torch.Tensor],
                    r: torch.Tensor) -> list:
    """Gradients of `(out * r).sum()` w.r.t. `tensors` (cleared afterwards)."""
    (out.float() * r).sum().backward()
    grads = [t.grad.detach().clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return grads


def assert_attention_matches(out, grads, ref_out, ref_grads, what: str) -> None:
    assert_bf16_close(out, ref_out, f"{what}: output")
    for name, g, ref in zip("qkv", grads, ref_grads):
        assert_bf16_close(g, ref, f"{what}: d{name}")
