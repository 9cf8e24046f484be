"""trainer.precision=auto: bf16 only where it is fast (CUDA, CPUs with native bf16), fp32
elsewhere; an explicit bf16 on an emulating CPU runs with a warning. The probe is faked, so
both branches are tested on any machine."""

from __future__ import annotations

import pytest

from danube import runtime
from danube.config.compose import compose_pretrain_config, load_yaml_config
from danube.config.validate import normalized_precision, validate
from danube.runtime import resolve_precision


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "32")])
def test_auto_follows_the_cpu_probe(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: native)
    choice = resolve_precision("auto", cuda=False)
    assert choice.precision == expected
    assert choice.warning is None
    assert runtime.cpu_capability() in choice.reason
    assert ("without native bf16" in choice.reason) is (not native)


def test_auto_on_cuda_is_bf16_whatever_the_cpu(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: False)
    choice = resolve_precision("auto", cuda=True)
    assert (choice.precision, choice.warning) == ("bf16-mixed", None)
    assert "CUDA" in choice.reason


@pytest.mark.parametrize("requested", ["bf16-mixed", "bf16"])
def test_explicit_bf16_on_an_emulating_cpu_runs_with_one_warning(monkeypatch, requested):
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: False)
    choice = resolve_precision(requested, cuda=False)
    assert choice.precision == requested
    assert choice.warning is not None and "\n" not in choice.warning
    assert "30x slower" in choice.warning and "trainer.precision=32" in choice.warning


@pytest.mark.parametrize("requested, native", [("bf16-mixed", True), ("32", False)])
def test_explicit_choices_that_fit_the_cpu_do_not_warn(monkeypatch, requested, native):
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: native)
    choice = resolve_precision(requested, cuda=False)
    assert (choice.precision, choice.warning) == (requested, None)


def test_auto_is_the_default_and_never_reaches_the_model_unresolved():
    cfg = compose_pretrain_config("danube_tiny")
    assert cfg.trainer.precision == "auto"
    assert validate(cfg) == []
    with pytest.raises(ValueError, match="resolved"):
        normalized_precision("auto")


def test_fp8_accepts_auto_and_refuses_fp32():
    ok = compose_pretrain_config("danube_1.8b", ["trainer.precision=auto"])
    assert not [p for p in validate(ok) if "precision" in p]
    bad = compose_pretrain_config("danube_1.8b", ["trainer.precision=32"])
    assert any("fp8=true needs trainer.precision" in p for p in validate(bad))


def test_launch_states_and_saves_the_choice(tmp_path):
    """A real launch (0 steps): the start line and the saved config.yaml say what ran and why,
    and the saved config loads back with the resolved value."""
    from tests.conftest import QUIET, SMALL_MODEL, run_pretrain

    result = run_pretrain([*SMALL_MODEL, *QUIET, "trainer.max_steps=0",
                           "model.optim.sched.max_steps=4", "model.optim.sched.warmup_steps=1",
                           f"exp_manager.exp_dir={tmp_path}"])
    expected = resolve_precision("auto", cuda=False)
    line = next(x for x in result.stdout.splitlines() if x.startswith("training "))
    assert f"precision {expected.precision} ({expected.reason})" in line
    for path in (tmp_path / "danube_tiny" / "config.yaml",
                 tmp_path / "danube_tiny" / "checkpoints" / "step_00000000" / "config.yaml"):
        text = path.read_text()
        assert text.startswith(f"# trainer.precision={expected.precision}: {expected.reason}")
        assert load_yaml_config(path).trainer.precision == expected.precision
