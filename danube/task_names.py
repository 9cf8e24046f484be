"""The offline evaluation tasks' names (eval/tasks/*.yaml), read from the YAML text: cheap
enough for config validation. Imports nothing of ours, so config/ can ask it without reaching
up into evaluation/."""

from __future__ import annotations

import re
from pathlib import Path

EVAL_TASKS_DIR = Path(__file__).resolve().parents[1] / "eval" / "tasks"


def offline_task_names() -> set:
    """Task and group names defined under eval/tasks/."""
    names = set()
    for path in EVAL_TASKS_DIR.rglob("*.yaml"):
        names.update(re.findall(r"^(?:task|group):[ \t]*['\"]?([\w.-]+)", path.read_text(), re.M))
    return names
