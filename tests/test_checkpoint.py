"""Checkpoint directories: atomic commits, what counts as complete, retention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from danube.training import checkpoint as ckpt
from danube.training.checkpoint_dirs import (
    CheckpointMeta,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    read_meta,
)


def _complete(root: Path, step: int, val_loss=None) -> Path:
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "danube_checkpoint.json").write_text(
        json.dumps({"step": step, "consumed_samples": step * 16, "val_loss": val_loss}))
    return path


class _Stub:
    """Stands in for model chunks, optimizer and scheduler: no state of their own."""

    def sharded_state_dict(self, *args, **kwargs):
        return {}

    def state_dict(self):
        return {"num_steps": 3}


def test_incomplete_and_temporary_directories_are_never_picked(tmp_path):
    good = _complete(tmp_path, 10)
    (tmp_path / ".tmp-step_00000020").mkdir()  # a save killed midway
    (tmp_path / "step_00000030").mkdir()  # no danube_checkpoint.json
    (tmp_path / "step_notanumber").mkdir()
    assert [p for _, p in list_checkpoints(tmp_path)] == [good]
    assert latest_checkpoint(tmp_path) == good
    assert not is_complete(tmp_path / "step_00000030")
    assert latest_checkpoint(tmp_path / "missing") is None


def test_a_killed_save_leaves_the_last_good_checkpoint(tmp_path, megatron_world, monkeypatch):
    good = _complete(tmp_path, 10)

    def killed(state, directory, **kwargs):
        Path(directory, "__0_0.distcp").write_bytes(b"half")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt.dist_checkpointing, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path / "step_00000020", [_Stub()],
                             CheckpointMeta(step=20, consumed_samples=320), "a: 1\n",
                             optimizer=_Stub(), scheduler=_Stub())
    assert (tmp_path / ".tmp-step_00000020" / "__0_0.distcp").exists()
    assert not (tmp_path / "step_00000020").exists()
    assert latest_checkpoint(tmp_path) == good

    def written(state, directory, **kwargs):
        Path(directory, "__0_0.distcp").write_bytes(b"whole")

    monkeypatch.setattr(ckpt.dist_checkpointing, "save", written)
    path = ckpt.save_checkpoint(tmp_path / "step_00000020", [_Stub()],
                                CheckpointMeta(step=20, consumed_samples=320), "a: 1\n",
                                optimizer=_Stub(), scheduler=_Stub())
    assert path == tmp_path / "step_00000020" and latest_checkpoint(tmp_path) == path
    assert not (tmp_path / ".tmp-step_00000020").exists()
    assert (path / "__0_0.distcp").read_bytes() == b"whole"
    assert (path / "config.yaml").read_text() == "a: 1\n"
    meta = read_meta(path)
    assert (meta.step, meta.consumed_samples) == (20, 320) and meta.saved_at > 0


def test_saving_a_step_again_replaces_it_whole(tmp_path, megatron_world, monkeypatch):
    old = _complete(tmp_path, 20)
    (old / "stale.distcp").write_text("old run")
    monkeypatch.setattr(ckpt.dist_checkpointing, "save",
                        lambda state, d, **kwargs: Path(d, "fresh.distcp").write_text("new"))
    ckpt.save_checkpoint(old, [_Stub()], CheckpointMeta(step=20, consumed_samples=1), "",
                         optimizer=_Stub(), scheduler=_Stub())
    assert sorted(p.name for p in old.iterdir()) == [
        "config.yaml", "danube_checkpoint.json", "fresh.distcp"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000020"]


def test_prune_keeps_the_newest_k_by_step(tmp_path):
    for step in (10, 20, 30, 40):
        _complete(tmp_path, step)
    removed = ckpt.prune_checkpoints(tmp_path, keep=2, monitor="step")
    assert sorted(p.name for p in removed) == ["step_00000010", "step_00000020"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]


def test_prune_by_val_loss_also_keeps_the_newest(tmp_path):
    for step, loss in ((10, 3.0), (20, 2.0), (30, 2.5), (40, 2.9)):
        _complete(tmp_path, step, loss)
    ckpt.prune_checkpoints(tmp_path, keep=1, monitor="val_loss")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 40]  # best, and newest for resume
