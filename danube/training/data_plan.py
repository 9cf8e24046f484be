"""The data plan: what fixes the order in which a run reads its training data.

Every checkpoint records its run's plan (danube_checkpoint.json, `data_plan`). A resume whose
plan reads the data in a different order is refused before anything is loaded, unless
`exp_manager.resume_accept_data_plan_change=true` says the change is meant; then the log says
what was rebuilt. A resume reads sample `consumed_samples` onwards (pretraining) or global
batch `step` onwards (SFT, DPO): that is only the continuation of the run so far when the
order behind those numbers is the same.

A plan is a flat-ish JSON dict built by its recipe (`danube.data.gpt.data_plan` for
pretraining, `chat_data_plan` here for SFT and DPO). Two plans keep the order when they are
equal except for
- where a source lives (`path`): data moved between filesystems, same contents;
- pretraining's sample counts (`samples`), provided every source stays within one epoch in
  both: megatron-core's GPTDataset shuffles one epoch the same whatever the sample count
  (a source read for several epochs is shuffled over all of them, so its order depends on
  the count), and the blend interleaves by a greedy rule whose prefix does not depend on the
  total.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

ACCEPT_KEY = "exp_manager.resume_accept_data_plan_change"


class DataPlanChanged(ValueError):
    """A resume would read the training data in another order than the run so far."""


def _flatten(value, prefix: str = "") -> Dict[str, object]:
    if isinstance(value, dict):
        out: Dict[str, object] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def plan_changes(saved: dict, current: dict) -> List[str]:
    """`key: saved -> current` for every entry that differs."""
    old, new = _flatten(saved), _flatten(current)
    return [f"{key}: {old.get(key, '(none)')} -> {new.get(key, '(none)')}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def _leaf(key: str) -> str:
    return key.split(".")[-1].split("[")[0]


def order_kept(saved: dict, current: dict) -> bool:
    """Whether `current` reads the same data in the same order as `saved` (module docstring)."""
    old, new = _flatten(saved), _flatten(current)
    differing = {k for k in set(old) | set(new) if old.get(k) != new.get(k)}
    if any(_leaf(k) not in ("path", "samples") for k in differing):
        return False
    if any(_leaf(k) == "samples" for k in differing):
        epochs = [v for flat in (old, new) for k, v in flat.items() if _leaf(k) == "epochs"]
        return all(e == 1 for e in epochs)
    return True


def check_resume(saved: Optional[dict], current: Optional[dict], accept: bool,
                 checkpoint: str, horizon_hint: str = "") -> Optional[str]:
    """None when the resume keeps the order (or nothing can be compared); else a line for the
    log when `accept`; raises DataPlanChanged when not."""
    if saved is None or current is None:
        return None
    if order_kept(saved, current):
        return None
    changes = "; ".join(plan_changes(saved, current))
    if accept:
        return (f"the data plan changed since {checkpoint} ({changes}) and {ACCEPT_KEY}=true: "
                "the training order was rebuilt for this run's plan; the resumed position "
                "(consumed samples / step) now indexes the new order")
    raise DataPlanChanged(
        f"resuming {checkpoint} would read the training data in a different order than the "
        f"run so far: {changes}. {horizon_hint}To change the data on purpose, add "
        f"{ACCEPT_KEY}=true (the order is rebuilt and the resumed position indexes it); to "
        "start over, use a new exp_manager.name")


def file_fingerprint(path: str) -> dict:
    """Where a data file is and how big: enough to notice it was replaced or appended to."""
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path)}


def chat_data_plan(files: List[str], records: int, global_batch_size: int, seed: int,
                   shuffle: bool) -> dict:
    """SFT / DPO: global batch k holds records `global_batch_indices(records, gbs, k, seed,
    shuffle)` of the tokenized files (packing only rearranges rows within a batch)."""
    return {"files": [file_fingerprint(f) for f in files], "records": records,
            "global_batch_size": global_batch_size, "seed": seed, "shuffle": shuffle}
