"""Hugging Face (Llama / Mistral) <-> danube checkpoints, exact and streaming."""

import contextlib
import shutil
from pathlib import Path


class ConversionError(ValueError):
    """Every reason a conversion cannot start, one per line (raised before anything is
    written)."""

    def __init__(self, problems):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cannot convert:\n{lines}")


def output_problem(final: Path):
    """Why `final` cannot receive a conversion (we never write into existing results)."""
    if final.exists() and any(final.iterdir()):
        return f"{final} exists and is not empty: choose a new output directory"
    return None


@contextlib.contextmanager
def staged_output(final: Path):
    """A fresh `.tmp-<name>` sibling to write into: renamed to `final` (absent or empty) when
    the block completes, removed if it fails. No half-written `final` ever exists."""
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        final.rmdir()
    tmp.rename(final)
