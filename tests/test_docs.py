"""The generated reference stays current: docs/configs.md lists every key of the schemas with
its default and docstring (docs/gen_configs.py), and a key without a docstring is a gap."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_configs_md_is_current_and_every_key_is_documented():
    run = subprocess.run([sys.executable, "docs/gen_configs.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr + " (run: python docs/gen_configs.py)"
    text = (ROOT / "docs" / "configs.md").read_text()
    for key in ("`model.dpo.label_smoothing`", "`model.peft.lora_tuning.dropout_position`",
                "`exp_manager.checkpoint_callback_params.async_save`",
                "`model.data.validation_ds.prompt_template`"):
        assert key in text, key
    undocumented = [line.split("|")[1].strip() for line in text.splitlines()
                    if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert undocumented == [], undocumented


def test_the_demo_announces_six_stages_that_exist():
    """`make demo` runs launchers/demo.py, whose plan names each stage with its purpose and
    work, and every command it runs is a script of this repository."""
    import re

    assert "$(BIN)/python launchers/demo.py" in (ROOT / "Makefile").read_text()
    run = subprocess.run([sys.executable, "launchers/demo.py", "--plan"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    headers = re.findall(r"^\[(\d)/6\] (\w+): ", run.stdout, re.M)
    assert [t for _, t in headers] == ["Pretraining", "SFT", "DPO", "Evaluation", "Chat",
                                       "Plots"]
    for line in run.stdout.splitlines():
        if line.strip().startswith("$ "):
            script = line.split()[2]
            assert (ROOT / script).is_file(), script


def test_the_demo_s_stated_work_is_the_shipped_configs_and_precision_reaches_every_stage():
    """What each banner says the stage does is what the shipped config does (steps, batch), and
    `--precision 32`, the default, reaches the five stages that run a model."""
    import re

    from danube.config.compose import compose_pretrain_config

    run = subprocess.run([sys.executable, "launchers/demo.py", "--plan", "--precision", "32"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    plan = run.stdout
    tiny = compose_pretrain_config("danube_tiny", [])
    assert (f"({tiny.trainer.max_steps} steps of {tiny.model.global_batch_size} x "
            f"{tiny.model.encoder_seq_length} tokens") in plan
    for name in ("sft/danube_tiny_sft", "dpo/danube_tiny_dpo"):
        text = (ROOT / "configs" / f"{name}.yaml").read_text()
        steps = re.search(r"^  max_steps: (\d+)", text, re.M).group(1)
        batch = re.search(r"^  global_batch_size: (\d+)", text, re.M).group(1)
        assert f"({steps} steps of {batch} " in plan, (name, steps, batch)
    commands = [line for line in plan.splitlines() if line.strip().startswith("$ ")]
    assert [c.endswith("trainer.precision=32") for c in commands[:3]] == [True] * 3
    assert [c.endswith("--precision 32") for c in commands[3:5]] == [True] * 2
    assert "precision" not in commands[5]
    # fp32 is the default: every machine runs the same recipe (auto would be bf16 on some)
    default = subprocess.run([sys.executable, "launchers/demo.py", "--plan"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert default.stdout == plan
    auto = subprocess.run([sys.executable, "launchers/demo.py", "--plan", "--precision", "auto"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "precision" not in auto
