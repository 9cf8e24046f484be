"""The CPU compatibility module: every patch listed, every patch doing its job, and a loud
failure if megatron-core changes under it."""

from __future__ import annotations

import importlib.metadata
import logging

import pytest
import torch

from danube import cpu_compat


@pytest.fixture
def compat():
    was_applied = cpu_compat.is_applied()
    assert cpu_compat.apply()
    yield
    if not was_applied:
        cpu_compat.remove()


def test_pinned_megatron_core_line():
    """The patches were measured on megatron-core 0.16; a new line needs a new look."""
    assert importlib.metadata.version("megatron-core").startswith("0.16.")


def test_every_patch_is_listed_in_the_docstring():
    doc = cpu_compat.__doc__
    for owner, name, _ in cpu_compat._targets():
        assert f"{name}" in doc, f"{owner.__name__}.{name} is patched but not documented"
    for item in ("TorchFunctionMode", "Tensor.type()", "CPU RNG state changed"):
        assert item in doc


def test_patched_megatron_sites_still_exist():
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer import utils

    assert callable(mcore_random._get_cuda_rng_state)
    assert callable(mcore_random._set_cuda_rng_state)
    # If megatron stops hard-coding CUDA here, patch 5a may be unnecessary: look again.
    import inspect

    assert 'device="cuda"' in inspect.getsource(utils.get_sliding_window_causal_mask)


def test_devices_are_rewritten_to_cpu(compat):
    from megatron.core.transformer.utils import get_sliding_window_causal_mask

    assert torch.cuda.current_device() == "cpu"
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert get_sliding_window_causal_mask(4, 4, (1, 0)).device.type == "cpu"
    torch.cuda.synchronize()


def test_tensor_type_reports_cuda_names(compat):
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64  # the casting form is untouched


def test_rng_patches_seed_and_fork_the_cpu_generator(compat):
    from megatron.core.tensor_parallel.random import (
        get_cuda_rng_tracker,
        model_parallel_cuda_manual_seed,
    )

    def draws():
        model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
        default = torch.rand(3)
        with get_cuda_rng_tracker().fork():
            forked = torch.rand(3)
        return default, forked

    (a, fa), (b, fb) = draws(), draws()
    assert torch.equal(a, b) and torch.equal(fa, fb)  # seeding works (patch 3)
    assert not torch.equal(a, fa)  # the tracker stream is its own (patch 2)
    torch.cuda.manual_seed(7)
    assert torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())


def test_fork_warning_is_filtered(compat, caplog):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with caplog.at_level(logging.WARNING):
        with get_cuda_rng_tracker().fork():
            torch.rand(1)
    assert "CPU RNG state changed" not in caplog.text


def test_remove_restores_and_cuda_machines_are_untouched(monkeypatch):
    was_applied = cpu_compat.is_applied()
    cpu_compat.remove()
    originals = {(o, n): getattr(o, n) for o, n, _ in cpu_compat._targets()}
    assert torch.ones(1).type() == "torch.FloatTensor"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.apply() is False
    assert {(o, n): getattr(o, n) for o, n, _ in cpu_compat._targets()} == originals
    monkeypatch.undo()
    assert cpu_compat.apply() is True
    assert torch.cuda.current_device() == "cpu"
    if not was_applied:
        cpu_compat.remove()
        assert all(getattr(o, n) is f for (o, n), f in originals.items())


def test_cuda_events_time_on_the_wall_clock(compat):
    """Patch 7: the inference controller times steps with CUDA events."""
    import inspect

    from megatron.core.inference.text_generation_controllers import text_generation_controller

    assert "torch.cuda.Event(enable_timing=True)" in inspect.getsource(text_generation_controller)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    end.record()
    end.synchronize()
    assert start.elapsed_time(end) >= 0.0


def test_another_thread_needs_in_this_thread(compat):
    """torch keeps function modes per thread: a thread sees CUDA devices rewritten only inside
    `in_this_thread()` (the server's engine thread runs megatron there)."""
    import threading

    seen = {}

    def work():
        try:
            torch.zeros(1, device="cuda")
            seen["bare"] = "cpu"
        except (AssertionError, RuntimeError):
            seen["bare"] = "refused"
        with cpu_compat.in_this_thread():
            seen["inside"] = torch.zeros(1, device="cuda").device.type

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == {"bare": "refused", "inside": "cpu"}
