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
