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
from tests.conftest import run_pretrain, write_indexed

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


def _fake_checkpoint(root, step, config_yaml, embedding_rows=None):
    """The files of a checkpoint: ours, and a DCP .metadata naming the embedding's shape
    (tensor contents do not matter to preflight)."""
    import pickle

    import torch
    from torch.distributed.checkpoint.metadata import (
        Metadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(config_yaml)
    (path / "danube_checkpoint.json").write_text(json.dumps({"step": step, "consumed_samples": 0}))
    for name in ("metadata.json", "common.pt"):
        (path / name).write_bytes(b"")
    tensors = {}
    if embedding_rows is not None:
        tensors["embedding.word_embeddings.weight"] = TensorStorageMetadata(
            TensorProperties(dtype=torch.float32), torch.Size([embedding_rows, 256]), [])
    (path / ".metadata").write_bytes(pickle.dumps(Metadata(state_dict_metadata=tensors)))
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


def test_a_checkpoint_of_another_vocabulary_size_is_named(tmp_path):
    """The embedding rows in the checkpoint's metadata against the rows this config builds."""
    cfg = compose_pretrain_config("danube_tiny", [f"exp_manager.exp_dir={tmp_path}"])
    _fake_checkpoint(tmp_path / "danube_tiny" / "checkpoints", 10, to_yaml(cfg), 8192)
    assert preflight(cfg, CPU) == []
    more = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=8200))
    problems = preflight(more, CPU)
    assert any("has 8192 vocabulary rows but this config builds 8320" in p for p in problems)


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


def test_damaged_indexed_datasets_are_named(tmp_path):
    from danube.indexed_files import indexed_dataset_problem

    prefix = str(tmp_path / "web")
    write_indexed(prefix, [[5, 6, 7, 2], [8, 9, 2]])
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
    write_indexed(str(tmp_path / "empty"), [])
    assert "no sequences" in indexed_dataset_problem(str(tmp_path / "empty"))


def test_a_prefix_too_small_for_its_splits_is_refused(tmp_path):
    """980,10,10 over 20 documents rounds the validation and test splits to no document, and
    megatron-core's GPTDataset then loops forever counting epochs: refused before the build."""
    from danube.indexed_files import empty_splits

    small, enough = str(tmp_path / "small"), str(tmp_path / "enough")
    write_indexed(small, [[5, 6, 7, 2]] * 20)
    write_indexed(enough, [[5, 6, 7, 2]] * 100)

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
    assert any("gives the test split nothing but trainer.limit_test_batches=2" in p
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


GPU_TE = Machine(world_size=1, cuda=True, transformer_engine=True)


def test_keys_that_would_do_nothing_are_refused_naming_the_backend():
    """reset_position_ids is inert under RoPE; reset_attention_mask is ignored by TE's causal
    kernels (our sdpa honours it); a window under context parallelism needs a2a/all_gather."""
    rope = compose_pretrain_config("danube_tiny", ["model.data.reset_position_ids=true"])
    assert any("reset_position_ids=true has no effect with position_embedding_type=rope" in p
               for p in validate(rope))
    learned = compose_pretrain_config("danube_tiny", [
        "model.data.reset_position_ids=true", "model.position_embedding_type=learned_absolute"])
    assert validate(learned) == []

    masked = compose_pretrain_config("danube_tiny", ["model.data.reset_attention_mask=true"])
    assert validate(masked) == [] and not preflight(masked, CPU)
    assert any("attention_backend=auto) ignores the attention mask" in p
               for p in preflight(masked, GPU_TE))
    sdpa = dataclasses.replace(masked, model=dataclasses.replace(masked.model,
                                                                 attention_backend="sdpa"))
    assert not [p for p in preflight(sdpa, GPU_TE) if "reset_attention_mask" in p]

    cp = ["model.context_parallel_size=2", "trainer.devices=2"]
    p2p = validate(compose_pretrain_config("danube_tiny", cp))
    assert any("cp_comm_type=p2p" in p and "window_size=128" in p for p in p2p)
    for kind in ("a2a", "all_gather"):
        ok = validate(compose_pretrain_config("danube_tiny", [*cp, f"model.cp_comm_type={kind}"]))
        assert not [p for p in ok if "cp_comm_type" in p]
    unwindowed = validate(compose_pretrain_config("danube_tiny", [*cp, "model.window_size=null"]))
    assert not [p for p in unwindowed if "cp_comm_type" in p]


def test_vocab_padding_needs_a_tp_divisible_divisor():
    bad = validate(compose_pretrain_config("danube_tiny", [
        "model.tensor_model_parallel_size=4", "model.make_vocab_size_divisible_by=2",
        "trainer.devices=4", "model.global_batch_size=8"]))
    assert any("make_vocab_size_divisible_by=2 must be a multiple of "
               "tensor_model_parallel_size=4" in p for p in bad)


def test_padded_vocabulary_does_not_depend_on_tp():
    from danube.config.derived import padded_vocab_size

    for tp in (1, 2, 4, 8):
        m = compose_pretrain_config("danube_tiny", [f"model.tensor_model_parallel_size={tp}"]).model
        assert padded_vocab_size(32000, m) == 32000
        assert padded_vocab_size(32001, m) == 32128
        assert padded_vocab_size(300, dataclasses.replace(m, vocab_size=32000)) == 32000


def test_accelerator_cpu_hides_cuda_from_the_process(monkeypatch):
    """accelerator=cpu on a GPU host: the launcher hides the GPUs before anything asks, so the
    run is the CPU one throughout (gloo, CPU shims, local spec, unbatched p2p)."""
    import os

    from danube import runtime

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    runtime.hide_cuda_for("auto")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    runtime.hide_cuda_for("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_seq_length_stages_are_checked():
    """A ramp ends at the model's length, divides into micro-batches,
    and trainer.max_steps stays within it (-1: all of it)."""
    def problems(stages, *extra):
        cfg = compose_pretrain_config("danube_tiny", [
            f"model.seq_length_stages={stages}", "model.encoder_seq_length=256",
            "model.global_batch_size=16", "model.micro_batch_size=4",
            "model.optim.sched.warmup_steps=1", *extra])
        return cfg, validate(cfg)

    good = "[{tokens:8192,encoder_seq_length:128,global_batch_size:32},"\
           "{tokens:8192,encoder_seq_length:256,global_batch_size:16}]"
    cfg, found = problems(good, "trainer.max_steps=-1")
    assert found == [] and cfg.trainer.max_steps == 4
    _, found = problems("[{tokens:8192,encoder_seq_length:128,global_batch_size:16},"
                        "{tokens:8192,encoder_seq_length:128,global_batch_size:6}]",
                        "trainer.max_steps=16")
    assert any("must be the longest stage's (128)" in p for p in found)
    assert not any("tokens per step" in p for p in found)  # allowed: a token-counted schedule
    assert any("[1].global_batch_size=6 must be divisible" in p for p in found)
    assert any("trainer.max_steps=16 exceeds the stages' 15 steps" in p for p in found)
    # A stage's own blend: one list, known embedded sources, files that exist (preflight).
    _, found = problems("[{tokens:8192,encoder_seq_length:128,global_batch_size:32,"
                        "data_prefix:{train:[1.0,embedded:code]}},"
                        "{tokens:8192,encoder_seq_length:256,global_batch_size:16,"
                        "data_prefix:[1.0,embedded:poetry]}]", "trainer.max_steps=-1")
    assert any("seq_length_stages[0].data_prefix: a stage takes one blend" in p for p in found)
    assert any("seq_length_stages[1].data_prefix: unknown embedded source 'embedded:poetry'"
               in p for p in found)
    from danube.config.preflight import Machine, preflight

    cfg, found = problems("[{tokens:8192,encoder_seq_length:128,global_batch_size:32},"
                          "{tokens:8192,encoder_seq_length:256,global_batch_size:16,"
                          "data_prefix:[1.0,/nowhere/text_document]}]", "trainer.max_steps=-1")
    assert found == []
    missing = preflight(cfg, Machine(world_size=1, cuda=False, transformer_engine=False))
    assert any(p.startswith("model.seq_length_stages[1].data_prefix: /nowhere/text_document.bin")
               for p in missing), missing


def test_nan_policy_skip_is_refused_under_fp32():
    """skip is megatron's grad-scaler check, which only the bf16 optimizer has."""
    from danube.config.preflight import Machine, preflight

    machine = Machine(world_size=1, cuda=False, transformer_engine=False)
    fp32 = compose_pretrain_config("danube_tiny", ["trainer.nan_policy=skip",
                                                   "trainer.precision=32"])
    assert any("nan_policy=skip runs under bf16" in p for p in preflight(fp32, machine))
    bf16 = compose_pretrain_config("danube_tiny", ["trainer.nan_policy=skip",
                                                   "trainer.precision=bf16-mixed"])
    assert not any("nan_policy" in p for p in preflight(bf16, machine))
