"""Checkpoint directories: atomic commits, what counts as complete, retention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from danube.paths import (
    CheckpointMeta,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    read_meta,
)
from danube.training import checkpoint as ckpt


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


def _tiny_model(tied: bool = False):
    from danube.config.schema import ModelConfig
    from danube.model.builder import build_model_chunks, transformer_config

    m = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, share_embeddings_and_output_weights=tied)
    return build_model_chunks(m, transformer_config(m, "32", False), 100, False)[0]


class _TEExtraState:
    """What Transformer Engine's modules add: an `_extra_state` entry (FP8 metadata) on a
    module the local spec has without one (here the core attention, as TEDotProductAttention)."""

    loaded = []

    def get_extra_state(self):
        return torch.tensor([7.0])

    def set_extra_state(self, state):
        _TEExtraState.loaded.append(state)


def _with_te_extra_state(monkeypatch):
    from danube.model.attention import SDPAttention

    _TEExtraState.loaded.clear()
    monkeypatch.setattr(SDPAttention, "get_extra_state", _TEExtraState.get_extra_state,
                        raising=False)
    monkeypatch.setattr(SDPAttention, "set_extra_state", _TEExtraState.set_extra_state,
                        raising=False)


def _save(model, path):
    return ckpt.save_checkpoint(path, [model], CheckpointMeta(step=0, consumed_samples=0), "")


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.endswith("_extra_state"))


def test_te_spec_model_loads_a_local_spec_checkpoint(tmp_path, megatron_world, monkeypatch):
    """Local-spec checkpoints (CPU runs, HF imports) lack the extra state TE modules ask for:
    the weights load, the missing extra state stays fresh."""
    local = _tiny_model()
    _save(local, tmp_path / "local")
    _with_te_extra_state(monkeypatch)
    te_like = _tiny_model()
    assert any(k.endswith("core_attention._extra_state") for k in te_like.state_dict())
    ckpt.load_checkpoint(tmp_path / "local", [te_like])
    assert _same_weights(te_like, local) and _TEExtraState.loaded == []


def test_local_spec_model_loads_a_te_spec_checkpoint(tmp_path, megatron_world, monkeypatch):
    _with_te_extra_state(monkeypatch)
    te_like = _tiny_model()
    _save(te_like, tmp_path / "te")
    monkeypatch.undo()
    local = _tiny_model()
    ckpt.load_checkpoint(tmp_path / "te", [local])
    assert _same_weights(local, te_like)


def test_a_checkpoint_missing_real_weights_is_refused(tmp_path, megatron_world):
    _save(_tiny_model(tied=True), tmp_path / "tied")  # no output_layer.weight
    with pytest.raises(ckpt.CheckpointMismatch, match="output_layer.weight"):
        ckpt.load_checkpoint(tmp_path / "tied", [_tiny_model(tied=False)])


def _agree_worker(rank: int, roots: list, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=2)
    from danube.training.loop import agreed_latest_checkpoint

    chosen = agreed_latest_checkpoint(Path(roots[rank]))
    Path(out, f"chosen{rank}").write_text(str(chosen))
    torch.distributed.destroy_process_group()


def test_every_rank_resumes_the_checkpoint_rank0_chose(tmp_path):
    """Two ranks whose listings differ (a shared filesystem seen at different moments) still
    load the same checkpoint: rank 0's."""
    from tests.conftest import free_port

    _complete(tmp_path / "rank0", 4)
    _complete(tmp_path / "rank1", 2)
    torch.multiprocessing.spawn(
        _agree_worker, args=([str(tmp_path / "rank0"), str(tmp_path / "rank1")], free_port(),
                             str(tmp_path)), nprocs=2)
    expected = str(tmp_path / "rank0" / "step_00000004")
    assert [(tmp_path / f"chosen{r}").read_text() for r in (0, 1)] == [expected, expected]


def test_prune_by_val_loss_never_keeps_nan_or_unscored_ones_before_real_losses(tmp_path):
    """{2.0, NaN, 1.5, 1.4, none} with k=2: the two lowest real losses and the newest stay.
    (Sorted naively, NaN compared as neither lower nor higher and none as 0.0: 2.0, NaN and the
    newest were kept, 1.5 and 1.4 deleted.) Among checkpoints without a loss, newest first;
    NaN after them."""
    for step, loss in ((1, 2.0), (2, float("nan")), (3, 1.5), (4, 1.4), (5, None)):
        _complete(tmp_path, step, loss)
    ckpt.prune_checkpoints(tmp_path, keep=2, monitor="val_loss")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4, 5]
    for step in (6, 7):
        _complete(tmp_path, step, None)
    _complete(tmp_path, 8, float("nan"))
    ckpt.prune_checkpoints(tmp_path, keep=4, monitor="val_loss")
    # 1.4, 1.5, then the newest unscored (7), then the next (6); NaN (8) only as the newest
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4, 6, 7, 8]


def test_a_commit_is_durable(tmp_path, megatron_world, monkeypatch):
    """Every file the commit writes (config, tokenizer files, metadata, megatron's common.pt
    and metadata.json, which its writer does not fsync) is fsynced before the rename, then the
    checkpoint and its parent directory, so a crash right after cannot leave a committed name
    over missing contents."""
    import os

    synced = []
    real_fsync = os.fsync

    def recording(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def written(state, directory, **kwargs):
        for name in ("__0_0.distcp", "common.pt", "metadata.json"):
            Path(directory, name).write_bytes(b"x")

    class _Tokenizer:
        def save_pretrained(self, path):
            Path(path).mkdir()
            (Path(path) / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(ckpt.dist_checkpointing, "save", written)
    monkeypatch.setattr(ckpt.os, "fsync", recording)
    path = ckpt.save_checkpoint(tmp_path / "ckpts" / "step_00000001", [_Stub()],
                                CheckpointMeta(step=1, consumed_samples=1), "a: 1\n",
                                tokenizer=_Tokenizer(), optimizer=_Stub(), scheduler=_Stub())
    tmp = path.with_name(".tmp-step_00000001")
    names = {p.name if p.parent in (tmp, path) else f"{p.parent.name}/{p.name}" for p in synced}
    assert {"config.yaml", "common.pt", "metadata.json", "danube_checkpoint.json",
            "tokenizer/tokenizer.json", "ckpts/.tmp-step_00000001"} <= names, names
    assert tmp_path / "ckpts" in synced  # the rename itself


def test_orphaned_temporary_saves_are_removed_with_a_log_line(tmp_path):
    from types import SimpleNamespace

    from danube.training.saving import remove_orphaned_saves

    root = tmp_path / "run" / "checkpoints"
    good = _complete(root, 10)
    for name in (".tmp-step_00000020", ".tmp-step_00000015"):
        (root / name).mkdir()
        (root / name / "__0_0.distcp").write_bytes(b"x" * 300_000)
    said = []
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(exp_manager=SimpleNamespace(exp_dir=str(tmp_path), name="run")),
        log=SimpleNamespace(info=said.append))
    import torch.distributed as dist

    if not dist.is_initialized():
        pytest.skip("needs the process group")
    remove_orphaned_saves(trainer)
    assert [p.name for p in root.iterdir()] == [good.name]
    assert said == ["removed 2 unfinished checkpoint save(s) (.tmp-step_00000015, "
                    ".tmp-step_00000020): 0.6 MB freed"]
