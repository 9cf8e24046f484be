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
