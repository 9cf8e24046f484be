"""Supervised fine-tuning: rendering as at inference, the loss mask, exact loss normalization
and packing, and the launcher end to end (equivalences step by step, fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from danube.config.schema import SFTDataConfig, SFTDatasetConfig
from danube.data.chat import (
    ChatDataError,
    ChatTemplate,
    encode_chat,
    messages_of,
)
from danube.data.sft import build_sft_dataset, collate_rows, pack_rows
from danube.data.tokenizer import load_tokenizer
from tests.conftest import CHAT, read_metrics, run_sft, train_records

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _trained_text(tokenizer, encoded) -> str:
    return "".join(tokenizer.hf.decode([i], skip_special_tokens=False)
                   for i, t in zip(encoded.ids, encoded.trained) if t)


@pytest.mark.parametrize("template", ["danube", "chatml"])
def test_training_ids_are_the_inference_ids(tokenizer_dir, tmp_path, template):
    """Whatever renders the training text renders the ids of transformers'
    apply_chat_template, and trains exactly the answers with their end-of-turn token."""
    from transformers import AutoTokenizer

    if template == "chatml":
        config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
        (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            {**config, "chat_template": None}))
        (tmp_path / "chat_template.jinja").write_text(CHATML)  # transformers 5's place
        directory = tmp_path
    else:
        directory = tokenizer_dir
    tokenizer = load_tokenizer(directory)
    encoded = encode_chat(CHAT, ChatTemplate.for_tokenizer(tokenizer), tokenizer, True, "x")
    reference = AutoTokenizer.from_pretrained(directory).apply_chat_template(
        CHAT, tokenize=True, return_dict=False)
    assert encoded.ids == list(reference)
    trained = _trained_text(tokenizer, encoded)
    if template == "danube":  # each answer and its </s>; the </s> after prompts is not
        assert trained == ("Return a string of the current directory.</s>"
                           "It is in `os`.</s>")
    else:  # each answer and its <|im_end|>, not the newline ChatML writes after it
        assert trained == ("Return a string of the current directory.<|im_end|>"
                           "It is in `os`.<|im_end|>")


def _write(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def _data(file_path, **ds) -> SFTDataConfig:
    return SFTDataConfig(train_ds=SFTDatasetConfig(
        file_path=str(file_path), **{"max_seq_length": 64, "global_batch_size": 2,
                                     "micro_batch_size": 1, **ds}))


def test_formats_masks_truncation_and_drops(tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(tokenizer_dir)
    nemo = {"system": "Be brief.", "mask": "User", "conversations": [
        {"from": "User", "value": CHAT[1]["content"]},
        {"from": "Assistant", "value": CHAT[2]["content"]}]}
    too_long = {"messages": [{"role": "user", "content": "x " * 200},
                             {"role": "assistant", "content": "ok"}]}
    path = _write(tmp_path / "d.jsonl", [{"messages": CHAT}, nemo, too_long])
    data = _data(path)
    ds = build_sft_dataset(data.train_ds, data, tokenizer, answer_only=True)
    assert ds.stats["dropped_no_answer_left"] == 1 and len(ds.samples) == 2
    assert messages_of(nemo, "x") == CHAT[:3]  # NeMo chat -> the same messages
    first = ds.samples[1]
    assert _trained_text(tokenizer, type("E", (), {"ids": first.ids.tolist(),
                                                   "trained": first.trained.tolist()})) \
        == "Return a string of the current directory.</s>"
    everything = build_sft_dataset(data.train_ds, data, tokenizer, answer_only=False)
    assert all(s.trained.all() for s in everything.samples)

    prompt_response = _write(tmp_path / "pr.jsonl", [{"input": "2+2", "output": "4"}])
    data = SFTDataConfig(chat=False, train_ds=SFTDatasetConfig(
        file_path=str(prompt_response), max_seq_length=64,
        prompt_template="Q: {input}\nA: {output}"))
    sample = build_sft_dataset(data.train_ds, data, tokenizer, True).samples[0]
    assert tokenizer.detokenize(sample.ids) == "Q: 2+2\nA: 4</s>"
    assert tokenizer.detokenize(sample.ids[sample.trained]) == "4</s>"  # add_eos: trained


@pytest.mark.parametrize("line, needle", [
    ("{not json", "d.jsonl:2: not a JSON object"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "d.jsonl:2: unknown role 'robot'"),
    ('{"conversations": [{"from": "Narrator", "value": "hi"}]}', "unknown speaker 'Narrator'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"text": "plain"}', "needs 'messages' or 'conversations'"),
])
def test_bad_records_name_file_and_line_or_are_skipped(tokenizer_dir, tmp_path, line, needle):
    tokenizer = load_tokenizer(tokenizer_dir)
    path = _write(tmp_path / "d.jsonl", [{"messages": CHAT}, line])
    data = _data(path)
    with pytest.raises(ChatDataError, match=needle.replace("(", r"\(")):
        build_sft_dataset(data.train_ds, data, tokenizer, True)
    skipped = build_sft_dataset(data.train_ds, data, tokenizer, True, on_error="skip")
    assert skipped.stats["skipped_bad_records"] == 1 and len(skipped.samples) == 1


def test_a_tokenizer_without_template_or_danube_markers_is_refused(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["plain text only"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ChatDataError, match="has no chat template and lacks"):
        ChatTemplate.for_tokenizer(load_tokenizer(tmp_path))


def test_packing_isolates_conversations_and_is_deterministic():
    """First-fit decreasing: 40 | 30 | 25 -> row 1 | 10 -> row 0 | 5 -> row 0."""
    rows = pack_rows([30, 10, 25, 40, 5], capacity=64, packed=True)
    assert rows == [[3, 1, 4], [0, 2]]
    assert pack_rows([30, 10, 25, 40, 5], 64, packed=False) == [[0], [1], [2], [3], [4]]
    batch = collate_rows([[]], 8, 0, packed=True)  # an empty row: nothing trained
    assert batch["loss_mask"].sum() == 0
    assert batch["cu_seqlens"].tolist() == [0, 8]  # its padding: one document of its own


def test_packed_batch_loss_equals_each_conversation_alone(tokenizer_dir, tmp_path,
                                                          megatron_world):
    """Two conversations in one packed row (window smaller than a conversation): the loss
    through megatron's schedule equals a hand computation over each conversation run alone:
    sum of cross-entropies over trained tokens / trained tokens."""
    from danube.config.schema import ModelConfig
    from danube.model.builder import build_model_chunks, transformer_config
    from danube.training.step import evaluate

    tokenizer = load_tokenizer(tokenizer_dir)
    second = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    path = _write(tmp_path / "two.jsonl", [{"messages": CHAT}, {"messages": second}])
    data = _data(path, max_seq_length=96)
    samples = build_sft_dataset(data.train_ds, data, tokenizer, True).samples
    assert sum(s.positions for s in samples) <= 96
    m = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, window_size=12, encoder_seq_length=96,
                    max_position_embeddings=96)
    torch.manual_seed(0)
    model = build_model_chunks(m, transformer_config(m, "32", False), tokenizer.vocab_size,
                               False)[0].eval()
    packed = collate_rows([samples], 96, 0, packed=True)
    ours = evaluate([model], [[packed]], torch.device("cpu"))["lm loss"]
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            ids = torch.from_numpy(sample.ids)[None]
            logits = model(ids[:, :-1], torch.arange(ids.shape[1] - 1)[None], None)
            losses = torch.nn.functional.cross_entropy(
                logits[0].double(), ids[0, 1:], reduction="none")
            mask = torch.from_numpy(sample.trained[1:])
            total += losses[mask].sum().item()
            count += int(mask.sum())
    assert ours == pytest.approx(total / count, rel=1e-5)


# --- the launcher ----------------------------------------------------------------------------

def _common(tmp_path, init_checkpoint):
    return [f"model.restore_from_path={init_checkpoint}", "model.encoder_seq_length=64",
            "model.global_batch_size=8", "model.micro_batch_size=4", "trainer.max_epochs=null",
            "trainer.max_steps=6", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0",
            "trainer.precision=32", "exp_manager.create_tensorboard_logger=false",
            "model.optim.sched.warmup_steps=1", "model.optim.sched.max_steps=10",
            "model.optim.lr=3e-3", f"exp_manager.exp_dir={tmp_path}",
            "exp_manager.checkpoint_callback_params.every_n_train_steps=3"]


def _packed(value: bool):
    return [f"model.data.train_ds.packed_sequence={str(value).lower()}"]


@pytest.fixture(scope="module")
def unpacked_run(tmp_path_factory, init_checkpoint):
    """The unpacked reference run's experiment (checkpoints at steps 3 and 6)."""
    exp = tmp_path_factory.mktemp("sft_reference")
    run_sft([*_common(exp, init_checkpoint), *_packed(False), "exp_manager.name=unpacked"])
    return exp / "unpacked"


@pytest.fixture(scope="module")
def unpacked_reference(unpacked_run):
    records = train_records(unpacked_run)
    assert list(records) == [1, 2, 3, 4, 5, 6]
    assert records[6]["loss"] < records[1]["loss"]
    return records


def _assert_same(records, reference, loss_rel=1e-5, norm_rel=2e-4):
    assert list(records) == list(reference)
    for step, ref in reference.items():
        assert records[step]["loss"] == pytest.approx(ref["loss"], rel=loss_rel), step
        assert records[step]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=norm_rel), step
        assert records[step]["trained_tokens"] == ref["trained_tokens"]


def test_packed_equals_unpacked(tmp_path, init_checkpoint, unpacked_reference):
    """Same conversations per step, each isolated in its row: the same loss and gradient."""
    run_sft([*_common(tmp_path, init_checkpoint), *_packed(True), "exp_manager.name=packed"])
    _assert_same(train_records(tmp_path / "packed"), unpacked_reference)


@pytest.mark.parametrize("layout, extra, nproc", [
    ("mb1", ["model.micro_batch_size=1"], 1),
    ("dp2_packed", _packed(True), 2),
    ("tp2", ["model.tensor_model_parallel_size=2"], 2),
    ("pp2", ["model.pipeline_model_parallel_size=2"], 2),
])
def test_layouts_follow_the_single_process_trajectory(tmp_path, init_checkpoint,
                                                      unpacked_reference, layout, extra, nproc):
    """Global per-token normalization: micro-batch 1 x 8 accumulation, DP=2 (packed, so the
    ranks hold different token counts), TP=2 and PP=2 equal micro-batch 4 on one process."""
    run_sft([*_common(tmp_path, init_checkpoint), *_packed(False), *extra,
             f"exp_manager.name={layout}"], nproc=nproc)
    _assert_same(train_records(tmp_path / layout), unpacked_reference)


def test_resume_equals_uninterrupted(tmp_path, init_checkpoint, unpacked_run,
                                     unpacked_reference):
    """The reference run's step-3 checkpoint, resumed in another experiment to the end: the
    reference's losses bit for bit."""
    import shutil

    common = [*_common(tmp_path, init_checkpoint), *_packed(False), "exp_manager.name=resumed"]
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(unpacked_run / "checkpoints" / "step_00000003",
                    tmp_path / "resumed" / "checkpoints" / "step_00000003")
    second = run_sft(common)
    assert "resumed from" in second.stdout and "(step 3)" in second.stdout
    records = train_records(tmp_path / "resumed")
    assert list(records) == [4, 5, 6]
    for step in records:
        assert records[step]["loss"] == unpacked_reference[step]["loss"], step


def test_dry_run_shows_the_mask_and_writes_nothing(tmp_path, init_checkpoint):
    result = run_sft([*_common(tmp_path, init_checkpoint), *_packed(True), "--dry-run", "1"])
    out = result.stdout
    assert "row 0:" in out and "[packed]" in out and "TRAIN pos" in out
    assert "'<|answer|>' ->" in out  # the answer's first token is predicted from <|answer|>
    assert "summary (train_ds):" in out and "answers ending in a trained token" in out
    assert not (tmp_path / "danube_tiny_sft").exists()


def test_bad_data_and_config_fail_before_anything_is_written(tmp_path, init_checkpoint):
    bad = _write(tmp_path / "bad.jsonl", [{"messages": CHAT}, "{oops"])
    result = run_sft([*_common(tmp_path, init_checkpoint),
                      f"model.data.train_ds.file_path={bad}"], check=False)
    assert result.returncode == 2 and "bad.jsonl:2: not a JSON object" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_sft([*_common(tmp_path, init_checkpoint), "model.data.train_ds.file_path=nope",
                      "model.data.train_ds.truncation_method=middle"], check=False)
    assert result.returncode == 2 and "nope not found" in result.stderr
    assert "truncation_method='middle'" in result.stderr
    result = run_sft([*_common(tmp_path, init_checkpoint),
                      f"model.restore_from_path={tmp_path}/nothing"], check=False)
    assert result.returncode == 2 and "not a complete danube checkpoint" in result.stderr
    assert not (tmp_path / "danube_tiny_sft").exists()


def test_sft_checkpoint_exports_to_hugging_face(tmp_path, init_checkpoint):
    """An SFT checkpoint (its config.yaml is an SFT config) converts like any other."""
    from tests.test_conversion import convert

    run_sft([*_common(tmp_path, init_checkpoint), "trainer.max_steps=1"])
    ckpt = tmp_path / "danube_tiny_sft" / "checkpoints" / "step_00000001"
    convert("mcore_to_hf.py", ckpt, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["hidden_size"] == 64
    assert any("val_loss" not in r for r in read_metrics(tmp_path / "danube_tiny_sft"))


# --- LoRA ------------------------------------------------------------------------------------

LORA = ["model.peft.peft_scheme=lora", "model.peft.lora_tuning.adapter_dim=4",
        "model.peft.lora_tuning.alpha=16",
        "model.peft.lora_tuning.target_modules=[attention_qkv,attention_dense,mlp_fc1,mlp_fc2]"]


def _lora_model(peft_scheme: str):
    from danube.config.schema import LoraTuningConfig, ModelConfig, PeftConfig
    from danube.model.builder import build_model_chunks, transformer_config

    m = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, window_size=8, encoder_seq_length=24,
                    max_position_embeddings=24)
    peft = PeftConfig(peft_scheme, LoraTuningConfig(
        adapter_dim=4, alpha=16, target_modules=["attention_qkv", "attention_dense", "mlp_fc1",
                                                 "mlp_fc2"]))
    return build_model_chunks(m, transformer_config(m, "32", False), 100, False, peft)[0]


def _logits(model, tokens):
    with torch.no_grad():
        return model.eval()(tokens, torch.arange(tokens.shape[1])[None], None)


def test_lora_starts_as_the_base_model_and_merges_exactly(tmp_path, megatron_world):
    """Zero-initialised B: the adapted model's logits are the base model's (loaded from a
    checkpoint without adapters); with trained (here random) adapters, W + (alpha/r) B A in
    the base gives the adapted logits; only adapters require gradients."""
    from danube.model.lora import LoRALinear
    from danube.model.lora_merge import merge_lora
    from danube.paths import CheckpointMeta
    from danube.training import checkpoint as ckpt

    torch.manual_seed(0)
    base = _lora_model("none")
    ckpt.save_checkpoint(tmp_path / "base", [base], CheckpointMeta(0, 0), "")
    lora = _lora_model("lora")
    with pytest.raises(ckpt.CheckpointMismatch, match="lora_"):
        ckpt.load_checkpoint(tmp_path / "base", [lora])  # adapters are optional only if asked
    ckpt.load_checkpoint(tmp_path / "base", [lora], optional=("lora_",))
    tokens = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(lora, tokens), _logits(base, tokens))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    assert len(trainable) == 2 * 4 * 2  # A and B x 4 targets x 2 layers

    with torch.no_grad():
        for module in lora.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(0, 0.1)
    adapted = _logits(lora, tokens)
    assert not torch.allclose(adapted, _logits(base, tokens))
    with torch.no_grad():
        for name, module in lora.named_modules():
            if isinstance(module, LoRALinear):
                target = base.get_submodule(name)
                target.weight.copy_(merge_lora(module.base.weight, module.lora_a, module.lora_b,
                                               module.scale))
    torch.testing.assert_close(_logits(base, tokens), adapted, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory, init_checkpoint):
    exp = tmp_path_factory.mktemp("lora_reference")
    run_sft([*_common(exp, init_checkpoint), *LORA, *_packed(True), "model.optim.lr=2e-2",
             "exp_manager.name=lora"])
    records = train_records(exp / "lora")
    assert list(records) == [1, 2, 3, 4, 5, 6] and records[6]["loss"] < records[1]["loss"]
    return exp / "lora"


def test_lora_trains_adapters_only_and_tp2_follows(tmp_path, init_checkpoint, lora_reference):
    """The saved base weights are the starting checkpoint's, bit for bit; adapters are saved;
    TP=2 (column- and row-parallel adapters) follows the single-process trajectory."""
    from danube.conversion.mcore_files import DistCheckpointReader
    from danube.paths import checkpoint_tensor_shapes

    final = lora_reference / "checkpoints" / "step_00000006"
    shapes = checkpoint_tensor_shapes(final)
    assert shapes["decoder.layers.self_attention.linear_qkv.lora_a"] == (4, 4, 64)
    assert shapes["decoder.layers.mlp.linear_fc2.lora_b"] == (4, 64, 4)
    before, after = DistCheckpointReader(init_checkpoint), DistCheckpointReader(final)
    for index in range(4):
        start, end = before.layer(index), after.layer(index)
        assert all(torch.equal(start[k], end[k]) for k in start)
    assert torch.equal(before.tensor("embedding.word_embeddings.weight"),
                       after.tensor("embedding.word_embeddings.weight"))
    run_sft([*_common(tmp_path, init_checkpoint), *LORA, *_packed(True), "model.optim.lr=2e-2",
             "model.tensor_model_parallel_size=2", "exp_manager.name=tp2"], nproc=2)
    _assert_same(train_records(tmp_path / "tp2"), train_records(lora_reference))


def test_lora_export_is_the_merged_model(tmp_path, lora_reference, megatron_world):
    """mcore_to_hf merges the adapters: HF's logits equal the adapted model's."""
    from danube.config.compose import load_model_config
    from danube.config.schema import LoraTuningConfig, PeftConfig
    from danube.model.builder import build_model_chunks, transformer_config
    from danube.training import checkpoint as ckpt
    from tests.test_conversion import convert, hf_logits

    final = lora_reference / "checkpoints" / "step_00000006"
    convert("mcore_to_hf.py", final, tmp_path / "hf")
    m = load_model_config(final / "config.yaml")
    peft = PeftConfig("lora", LoraTuningConfig(
        adapter_dim=4, alpha=16, target_modules=["attention_qkv", "attention_dense", "mlp_fc1",
                                                 "mlp_fc2"]))
    vocab = load_tokenizer(final / "tokenizer").vocab_size
    model = build_model_chunks(m, transformer_config(m, "32", False), vocab, False, peft)[0]
    ckpt.load_checkpoint(final, [model])
    tokens = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(2))
    ours = _logits(model, tokens)[..., :vocab]
    torch.testing.assert_close(hf_logits(tmp_path / "hf", tokens), ours, rtol=1e-4, atol=1e-4)


def test_validation_follows_train_rendering_and_refuses_a_set_below_one_batch(tmp_path,
                                                                         tokenizer_dir):
    """validation_ds takes train_ds's prompt_template, label_key, add_eos, add_bos and
    truncation keys unless set (NeMo-Aligner's YAML interpolates them); a validation set with
    fewer usable conversations than its global batch is an error that says how many it needs
    (it was skipped without a word)."""
    from danube.config.compose import compose_sft_config
    from danube.training.sft import _datasets

    cfg = compose_sft_config("danube_tiny_sft", [
        "model.data.train_ds.prompt_template='Q: {input} A: {output}'",
        "model.data.train_ds.add_eos=false", "model.data.validation_ds.label_key=answer"])
    val = cfg.model.data.validation_ds
    assert (val.prompt_template, val.add_eos, val.label_key) == ("Q: {input} A: {output}",
                                                                  False, "answer")
    few = _write(tmp_path / "val.jsonl", [{"messages": CHAT}] * 3)
    cfg = compose_sft_config("danube_tiny_sft", [
        f"model.data.validation_ds.file_path={few}", "model.data.validation_ds.global_batch_size=8",
        "trainer.limit_val_batches=2"])
    with pytest.raises(ChatDataError, match="has 3 usable conversation.*at least 8"):
        _datasets(cfg, load_tokenizer(tokenizer_dir))


def test_lora_adapter_only_export_loads_in_peft_onto_the_base(tmp_path, lora_reference):
    """`mcore_to_hf.py --adapter-only` writes a PEFT adapter directory; `peft` loads it onto
    the `--base-only` export of the same checkpoint, and the logits equal the merged export's
    (q/k/v de-interleaved from megatron's per-group order and gate/up split as the weights
    are; A shared by the blocks of a fused linear)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.conftest import ROOT
    from tests.test_conversion import convert

    final = lora_reference / "checkpoints" / "step_00000006"
    convert("mcore_to_hf.py", final, tmp_path / "merged")
    convert("mcore_to_hf.py", final, tmp_path / "base", "--base-only")
    convert("mcore_to_hf.py", final, tmp_path / "adapter", "--adapter-only")
    tokens = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 1]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    with torch.no_grad():
        plain = base(input_ids=tokens).logits
        want = merged.eval()(input_ids=tokens).logits
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = adapted(input_ids=tokens).logits
    assert not torch.allclose(plain, want, atol=1e-4)  # the adapters change the model
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    refused = convert("mcore_to_hf.py", ROOT / "nothing", tmp_path / "x", "--adapter-only",
                      check=False)
    assert refused.returncode != 0 and "has no config.yaml" in refused.stderr


@pytest.mark.parametrize("record, needle", [
    ({"mask": "Assistant"}, "mask='Assistant': only the user's turns can be masked"),
    ({"type": "TEXT_TO_VALUE"}, "SteerLM attribute labels (type='TEXT_TO_VALUE'"),
    ({"label": "quality:4"}, "1 labelled turn(s)"),
])
def test_nemo_record_fields_are_honoured_or_refused_by_name(record, needle):
    """NeMo chat records: mask User (and type VALUE_TO_TEXT with null labels) is plain chat;
    other masks and SteerLM labels are refused naming the field."""
    turns = [{"from": "User", "value": "hi", "label": None},
             {"from": "Assistant", "value": "hello", "label": None}]
    plain = {"system": "", "mask": "User", "type": "VALUE_TO_TEXT", "conversations": turns}
    assert [m["role"] for m in messages_of(plain, "x:1")] == ["user", "assistant"]
    if "label" in record:
        bad = {**plain, "conversations": [{**turns[0], "label": record["label"]}, turns[1]]}
    else:
        bad = {**plain, **record}
    import re

    with pytest.raises(ChatDataError, match=re.escape(needle)):
        messages_of(bad, "x:1")


@pytest.mark.parametrize("method", ["right", "left"])
def test_truncation_field_shortens_the_prompt_and_keeps_the_answer(tokenizer_dir, tmp_path,
                                                                  method):
    """NeMo's truncation_field: a prompt-response record over max_seq_length loses tokens of
    that field (right: its end, left: its start); the answer and its EOS stay whole and
    trained."""
    tokenizer = load_tokenizer(tokenizer_dir)
    words = " ".join(f"w{i}" for i in range(60))
    path = _write(tmp_path / "long.jsonl", [{"input": words, "output": "Return a string."}])
    data = SFTDataConfig(chat=False, train_ds=SFTDatasetConfig(
        file_path=str(path), max_seq_length=32, prompt_template="Q: {input}\nA: {output}",
        truncation_method=method))
    ds = build_sft_dataset(data.train_ds, data, tokenizer, True)
    sample = ds.samples[0]
    text = tokenizer.detokenize(sample.ids)
    assert len(sample.ids) <= 33 and sample.truncated and ds.stats["truncated"] == 1
    assert text.endswith("\nA: Return a string.</s>") and text.startswith("Q: ")
    kept = text[len("Q: "):text.index("\nA:")].strip()
    assert 0 < len(kept) < len(words)
    # a token-level cut: the start of the field (right) or its end (left)
    assert words.startswith(kept) if method == "right" else words.endswith(kept)
    assert tokenizer.detokenize(sample.ids[sample.trained]).strip() == "Return a string.</s>"


def test_prompt_response_trains_the_first_answer_token(tokenizer_dir, tmp_path):
    """With NeMo's default "{input} {output}" the first answer token carries the space
    ('ĠReturn' starts in the prompt); it is what the model must produce after the prompt and
    is trained (it was counted as prompt)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    path = _write(tmp_path / "pr.jsonl", [{"input": "What does `os.getcwd` do?",
                                           "output": "Return a string."}])
    data = SFTDataConfig(chat=False, train_ds=SFTDatasetConfig(
        file_path=str(path), max_seq_length=64))
    sample = build_sft_dataset(data.train_ds, data, tokenizer, True).samples[0]
    first = int(sample.trained.nonzero()[0][0])
    assert tokenizer.hf.id_to_token(int(sample.ids[first])).endswith("Return")
    assert tokenizer.detokenize(sample.ids[sample.trained]).strip() == "Return a string.</s>"
