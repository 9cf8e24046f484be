"""Bad input: one error naming every problem, before anything is built or written."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

from danube.config import ConfigError, check_launch
from danube.config.compose import compose_pretrain_config, to_yaml
from danube.config.preflight import Machine, preflight
from danube.config.validate import validate
from tests.conftest import run_pretrain

CPU = Machine(world_size=1, cuda=False, transformer_engine=False)
BAD = [
    "model.num_query_groups=3",  # 8 heads not divisible by 3
    "model.hidden_size=250",  # not divisible by 8 heads
    "model.global_batch_size=12",  # not divisible by micro 8 x DP 1
    "model.window_size=0",
    "model.encoder_seq_length=512",  # exceeds max_position_embeddings 256
    "model.virtual_pipeline_model_parallel_size=2",  # without pipeline parallelism
    "model.fp8=true", "model.fp8_e4m3=true",  # both formats
    "model.optim.sched.min_lr=1.0",  # above lr
    "trainer.precision=16",
    "model.data.data_prefix=[0.5,embedded:prose,0.5,embedded:poetry]",
]


def test_every_problem_is_reported_at_once():
    problems = validate(compose_pretrain_config("danube_tiny", BAD))
    text = "\n".join(problems)
    for needle in ["model.num_query_groups=3", "model.hidden_size=250",
                   "model.global_batch_size=12", "model.window_size=0",
                   "model.encoder_seq_length=512", "virtual_pipeline_model_parallel_size=2",
                   "exactly one of model.fp8_e4m3", "min_lr", "trainer.precision='16'",
                   "embedded:poetry"]:
        assert needle in text, f"{needle!r} missing from:\n{text}"
    with pytest.raises(ConfigError) as info:
        check_launch(compose_pretrain_config("danube_tiny", BAD), CPU)
    assert str(info.value).startswith(f"{len(info.value.problems)} problem(s)")
    assert len(info.value.problems) >= 11


def test_launcher_rejects_bad_config_and_writes_nothing(tmp_path):
    result = run_pretrain([*BAD, f"exp_manager.exp_dir={tmp_path}/out"], check=False)
    assert result.returncode == 2
    assert "problem(s) in the config" in result.stderr
    assert "model.num_query_groups=3" in result.stderr and "embedded:poetry" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_fp8_configs_validate_on_cpu_but_fail_fast_at_launch():
    cfg = compose_pretrain_config("danube_1.8b")
    assert validate(cfg) == []
    problems = preflight(cfg, Machine(world_size=8, cuda=False, transformer_engine=False))
    assert any("model.fp8=true needs Transformer Engine on a CUDA GPU" in p for p in problems)
    gpu = preflight(cfg, Machine(world_size=8, cuda=True, transformer_engine=True))
    assert not any("fp8" in p for p in gpu)


def test_missing_data_and_tokenizer_files_are_named(tmp_path):
    cfg = compose_pretrain_config("danube_1.8b", [f"exp_manager.exp_dir={tmp_path}"])
    problems = "\n".join(preflight(cfg, Machine(8, True, True)))
    assert "/data/danube/web_text_document.bin and .idx not found" in problems
    assert "model.tokenizer.model=/data/tokenizers/llama2: no tokenizer.json there" in problems


def test_world_size_must_match_the_launch():
    cfg = compose_pretrain_config("danube_tiny")
    problems = preflight(cfg, Machine(world_size=2, cuda=False, transformer_engine=False))
    assert any("launched with 2 process(es)" in p for p in problems)


def test_missing_psutil_is_caught_before_a_hanging_save(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "psutil" else real(name, *a))
    problems = preflight(compose_pretrain_config("danube_tiny"), CPU)
    assert any("psutil is not installed" in p for p in problems)


def _fake_checkpoint(root, step, config_yaml):
    """The files of a checkpoint (contents aside from ours do not matter to preflight)."""
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(config_yaml)
    (path / "danube_checkpoint.json").write_text(json.dumps({"step": step, "consumed_samples": 0}))
    for name in ("metadata.json", "common.pt", ".metadata"):
        (path / name).write_bytes(b"")
    return path


def test_existing_checkpoints_are_never_overwritten(tmp_path):
    cfg = compose_pretrain_config("danube_tiny", [f"exp_manager.exp_dir={tmp_path}",
                                                  "exp_manager.resume_if_exists=false"])
    ckpt = _fake_checkpoint(tmp_path / "danube_tiny" / "checkpoints", 100, to_yaml(cfg))
    problems = preflight(cfg, CPU)
    assert any("already holds checkpoints" in p for p in problems)
    result = run_pretrain([f"exp_manager.exp_dir={tmp_path}", "exp_manager.resume_if_exists=false"],
                          check=False)
    assert result.returncode == 2 and "already holds checkpoints" in result.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == [
        ".metadata", "common.pt", "config.yaml", "danube_checkpoint.json", "metadata.json"]


def test_resuming_with_another_architecture_is_refused(tmp_path):
    cfg = compose_pretrain_config("danube_tiny", [f"exp_manager.exp_dir={tmp_path}"])
    _fake_checkpoint(tmp_path / "danube_tiny" / "checkpoints", 10, to_yaml(cfg))
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hidden_size=512))
    problems = preflight(wider, CPU)
    assert any("model.hidden_size=512 but the checkpoint" in p for p in problems)
    assert preflight(cfg, CPU) == []


def test_restore_from_path_must_be_a_complete_checkpoint(tmp_path):
    cfg = compose_pretrain_config("danube_tiny", [f"model.restore_from_path={tmp_path}/nope"])
    assert any("is not a complete danube checkpoint" in p for p in preflight(cfg, CPU))


@pytest.mark.parametrize("prefix,needle", [
    ("[0.5,embedded:prose,-1,embedded:code]", "weight -1 must be a positive number"),
    ("[0.5,embedded:prose,0.5]", "even length"),
    ("[]", "data_prefix is empty"),
    ({"train": ["embedded:prose"], "valid": ["embedded:code"]}, "train/validation/test keys"),
])
def test_malformed_blends(prefix, needle):
    if isinstance(prefix, str):
        cfg = compose_pretrain_config("danube_tiny", [f"model.data.data_prefix={prefix}"])
    else:  # a per-split dict, as written in YAML
        cfg = compose_pretrain_config("danube_tiny")
        cfg.model.data.data_prefix = prefix
    problems = validate(cfg)
    assert any(needle in p for p in problems), problems


def test_embedded_data_needs_the_embedded_tokenizer():
    cfg = compose_pretrain_config("danube_tiny", ["model.tokenizer.library=huggingface",
                                                  "model.tokenizer.model=/x/tokenizer.json"])
    assert any("is tokenized with library=embedded" in p for p in validate(cfg))


def test_a_damaged_checkpoint_is_named_before_loading(tmp_path):
    cfg = compose_pretrain_config("danube_tiny", [f"exp_manager.exp_dir={tmp_path}"])
    ckpt = _fake_checkpoint(tmp_path / "danube_tiny" / "checkpoints", 10, to_yaml(cfg))
    (ckpt / "common.pt").unlink()
    problems = preflight(cfg, CPU)
    assert any("lacks common.pt" in p and "resume from the one before" in p for p in problems)
    (ckpt / "danube_checkpoint.json").write_text("{not json")
    assert any("danube_checkpoint.json is unreadable" in p for p in preflight(cfg, CPU))


def _indexed(prefix, documents):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in documents:
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")


def test_damaged_indexed_datasets_are_named(tmp_path):
    from danube.data.indexed import indexed_dataset_problem

    prefix = str(tmp_path / "web")
    _indexed(prefix, [[5, 6, 7, 2], [8, 9, 2]])
    assert indexed_dataset_problem(prefix) is None
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(10)  # an interrupted copy
    assert "has 10 bytes but its index describes 14" in indexed_dataset_problem(prefix)
    cfg = compose_pretrain_config("danube_tiny", [
        "model.tokenizer.library=huggingface", f"model.tokenizer.model={tmp_path}",
        f"model.data.data_prefix=[{prefix}]"])
    assert any("rebuild the dataset" in p for p in preflight(cfg, CPU))
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"GARBAGE!!")
    assert "not a Megatron index file" in indexed_dataset_problem(prefix)
    _indexed(str(tmp_path / "empty"), [])
    assert "no sequences" in indexed_dataset_problem(str(tmp_path / "empty"))


def test_a_prefix_too_small_for_its_splits_is_refused(tmp_path):
    """980,10,10 over 20 documents rounds the validation and test splits to no document, and
    megatron-core's GPTDataset then loops forever counting epochs: refused before the build."""
    from danube.data.indexed import empty_splits

    small, enough = str(tmp_path / "small"), str(tmp_path / "enough")
    _indexed(small, [[5, 6, 7, 2]] * 20)
    _indexed(enough, [[5, 6, 7, 2]] * 100)

    def problems(prefix, splits="980,10,10"):
        cfg = compose_pretrain_config("danube_tiny", [
            "model.tokenizer.library=huggingface", f"model.tokenizer.model={tmp_path}",
            f"model.data.data_prefix=[{prefix}]", f"model.data.splits_string='{splits}'"])
        return [p for p in preflight(cfg, CPU) if "document(s)" in p]

    assert empty_splits(20, "980,10,10") == ["validation", "test"]
    [problem] = problems(small)
    assert f"{small} holds 20 document(s)" in problem
    assert "validation and test split(s)" in problem and "at least 100" in problem
    assert problems(enough) == []
    assert problems(small, "1,0,0") == []  # splits without a share are not built
    assert empty_splits(251, "998,2,0") == [] and empty_splits(250, "998,2,0") == ["validation"]


def test_a_split_the_run_reads_must_get_data():
    cfg = compose_pretrain_config("danube_tiny", ["model.data.splits_string='990,10,0'"])
    assert any("gives the test split nothing but trainer.limit_test_batches=4" in p
               for p in validate(cfg))
    fine = compose_pretrain_config("danube_tiny", ["model.data.splits_string='990,10,0'",
                                                   "trainer.limit_test_batches=0"])
    assert validate(fine) == []


def test_distributed_optimizer_state_only_resumes_on_its_layout(tmp_path):
    cfg = compose_pretrain_config("danube_tiny", [f"exp_manager.exp_dir={tmp_path}",
                                                  "model.optim.name=distributed_fused_adam"])
    ckpt = _fake_checkpoint(tmp_path / "danube_tiny" / "checkpoints", 10, to_yaml(cfg))
    (ckpt / "danube_checkpoint.json").write_text(json.dumps({
        "step": 10, "consumed_samples": 160, "layout": {"tp": 2, "pp": 1},
        "optimizer_sharding": "dp_reshardable"}))
    problems = preflight(cfg, CPU)
    assert any("reshards across data-parallel sizes only" in p for p in problems), problems
