"""Hugging Face <-> danube conversion, proven by logits parity and bit-identical round trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import QUIET, ROOT, SMALL_MODEL, free_port, run_pretrain, run_script

SEQ = 24  # longer than the window below


def _tokenizer():
    from danube.data.tokenizer import train_byte_level_bpe

    text = ["def add(a, b):\n    return a + b  # sum", "The quick brown fox jumps over it."]
    return train_byte_level_bpe(text * 40, vocab_size=300)


def make_hf(path: Path, family: str, **shape) -> Path:
    """A tiny random HF model saved as transformers does, with a tokenizer.json."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    tok = _tokenizer()
    base = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, initializer_range=0.2, rms_norm_eps=1e-5)
    base.update(shape)
    torch.manual_seed(0)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**{"sliding_window": 8, **base}))
    else:
        model = LlamaForCausalLM(LlamaConfig(**base))
    model.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path


def convert(script: str, *args, check=True) -> subprocess.CompletedProcess:
    result = run_script(ROOT / "conversion" / script, [str(a) for a in args])
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-4000:])
    return result


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def our_logits(checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    from danube.config.compose import load_yaml_config
    from danube.model.builder import build_model_chunks, transformer_config
    from danube.training.checkpoint import load_checkpoint

    m = load_yaml_config(checkpoint / "config.yaml").model
    vocab = json.loads((checkpoint / "tokenizer" / "tokenizer.json").read_text())
    vocab_size = len(vocab["model"]["vocab"])
    model = build_model_chunks(m, transformer_config(m, "32", False), vocab_size, False)[0]
    load_checkpoint(checkpoint, [model])
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        return model.eval()(tokens, positions, None)[..., :vocab_size]


SHAPES = {
    "mistral_gqa_window": ("mistral", {}),
    "llama_mha_theta1e5_tied": ("llama", {"num_key_value_heads": 4, "rope_theta": 1e5,
                                           "tie_word_embeddings": True}),
    "llama_mqa_head_dim": ("llama", {"hidden_size": 48, "num_attention_heads": 4,
                                      "num_key_value_heads": 1, "head_dim": 16}),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_import_export_is_exact(tmp_path, megatron_world, name):
    from transformers import AutoModelForCausalLM

    family, shape = SHAPES[name]
    hf_dir = make_hf(tmp_path / "hf", family, **shape)
    convert("hf_to_mcore.py", hf_dir, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [
        "checkpoint", "config.yaml", "tokenizer"]
    tokens = torch.randint(0, 280, (2, SEQ), generator=torch.Generator().manual_seed(1))
    reference = hf_logits(hf_dir, tokens)
    torch.testing.assert_close(our_logits(tmp_path / "ours" / "checkpoint", tokens), reference,
                               rtol=1e-5, atol=1e-5)
    from danube.inference.model import open_checkpoint

    with open_checkpoint(tmp_path / "ours", "32") as im:  # what evaluate/generate/chat load
        torch.testing.assert_close(im.logits(tokens), reference, rtol=1e-5, atol=1e-5)

    convert("mcore_to_hf.py", tmp_path / "ours" / "checkpoint", tmp_path / "back",
            "--max-shard-size", "20KB")
    original = AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
    back_model = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    back = back_model.state_dict()
    assert type(back_model).__name__ == f"{family.capitalize()}ForCausalLM"
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)  # bit-identical
    torch.testing.assert_close(hf_logits(tmp_path / "back", tokens), reference, rtol=0, atol=0)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded


def test_exported_config_and_tokenizer(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    hf_dir = make_hf(tmp_path / "hf", "mistral", rope_theta=12345.0, rms_norm_eps=1e-5)
    convert("hf_to_mcore.py", hf_dir, tmp_path / "ours")
    convert("mcore_to_hf.py", tmp_path / "ours" / "checkpoint", tmp_path / "back")
    original, back = AutoConfig.from_pretrained(hf_dir), AutoConfig.from_pretrained(
        tmp_path / "back")
    for key in ("sliding_window", "rms_norm_eps", "tie_word_embeddings", "vocab_size",
                "max_position_embeddings", "num_key_value_heads", "head_dim"):
        assert getattr(back, key) == getattr(original, key), key
    assert back.rope_parameters["rope_theta"] == 12345.0
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    assert [getattr(back, k) for k in ids] == [getattr(original, k) for k in ids]
    raw = json.loads((tmp_path / "back" / "config.json").read_text())
    assert raw["rope_theta"] == 12345.0 and raw["torch_dtype"] == "float32"  # 4.x readers
    assert (tmp_path / "back" / "generation_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(tmp_path / "back")
    chat = tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat == "<|system|>be brief</s><|prompt|>hi</s><|answer|>"


@pytest.mark.parametrize("style", ["transformers4", "transformers5"])
def test_both_config_generations_import(tmp_path, style):
    hf_dir = make_hf(tmp_path / "hf", "llama", rope_theta=500000.0)
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.pop("rope_theta", None)
    if style == "transformers4":
        config["rope_theta"] = 500000.0
    else:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (hf_dir / "config.json").write_text(json.dumps(config))
    convert("hf_to_mcore.py", hf_dir, tmp_path / "ours")
    from danube.config.compose import load_yaml_config

    assert load_yaml_config(tmp_path / "ours" / "config.yaml").model.rotary_base == 500000.0


def test_pytorch_bin_checkpoints_import(tmp_path):
    hf_dir = make_hf(tmp_path / "hf", "mistral")
    from safetensors.torch import load_file

    weights = load_file(hf_dir / "model.safetensors")
    (hf_dir / "model.safetensors").unlink()
    torch.save(weights, hf_dir / "pytorch_model.bin")
    convert("hf_to_mcore.py", hf_dir, tmp_path / "ours")
    assert (tmp_path / "ours" / "checkpoint" / "danube_checkpoint.json").is_file()


@pytest.mark.parametrize("edit,needle", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling type 'llama3'"),
    ({"attention_bias": True}, "biases are not supported"),
    ({"num_local_experts": 8}, "mixture-of-experts"),
    ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel' is not supported"),
])
def test_unsupported_models_fail_before_writing(tmp_path, edit, needle):
    hf_dir = make_hf(tmp_path / "hf", "llama")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, **edit}))
    result = convert("hf_to_mcore.py", hf_dir, tmp_path / "ours", check=False)
    assert result.returncode != 0 and needle in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ours").exists() and not (tmp_path / ".tmp-ours").exists()


def test_missing_pieces_and_existing_outputs_are_all_reported(tmp_path):
    hf_dir = make_hf(tmp_path / "hf", "llama")
    (hf_dir / "tokenizer.json").unlink()
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "keep.txt").write_text("mine")
    result = convert("hf_to_mcore.py", hf_dir, tmp_path / "ours", check=False)
    assert "has no tokenizer.json" in result.stderr and "is not empty" in result.stderr
    assert [p.name for p in (tmp_path / "ours").iterdir()] == ["keep.txt"]
    result = convert("mcore_to_hf.py", tmp_path / "nowhere", tmp_path / "out", check=False)
    assert result.returncode != 0 and "not a directory" in result.stderr


def test_an_interrupted_export_leaves_no_output(tmp_path, monkeypatch):
    from danube.conversion import exporter
    from danube.conversion.hf_files import ShardedSafetensorsWriter

    hf_dir = make_hf(tmp_path / "hf", "mistral")
    convert("hf_to_mcore.py", hf_dir, tmp_path / "ours")

    def killed(self):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ShardedSafetensorsWriter, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        exporter.export_hf(tmp_path / "ours" / "checkpoint", tmp_path / "back")
    assert not (tmp_path / "back").exists() and not (tmp_path / ".tmp-back").exists()
    monkeypatch.undo()
    exporter.export_hf(tmp_path / "ours" / "checkpoint", tmp_path / "back")  # a rerun works
    assert (tmp_path / "back" / "config.json").is_file()
    assert not (tmp_path / ".tmp-back").exists()


def test_shards_are_written_as_they_fill(tmp_path):
    from danube.conversion.hf_files import ShardedSafetensorsWriter

    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=1000)
    for index in range(10):
        writer.add(f"w{index}", torch.zeros(100))  # 400 bytes each
        assert writer.buffered_bytes <= 1000
    writer.finish()
    assert writer.peak_buffered_bytes == 800 and len(writer.shards) == 5
    assert sorted(p.name for p in tmp_path.iterdir())[0] == "model-00001-of-00005.safetensors"


def write_imported_corpus(imported: Path, prefix: Path) -> None:
    """200 short documents in an imported model's tokenizer, as a Megatron indexed dataset."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from danube.data.tokenizer import load_tokenizer

    tok = load_tokenizer(imported / "tokenizer")
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for i in range(200):
        ids = tok.tokenize(f"def f{i}(x):\n    return x + {i}  # the quick brown fox") + [tok.eod]
        builder.add_document(ids, [len(ids)])
    builder.finalize(f"{prefix}.idx")


def test_imported_config_continues_pretraining(tmp_path):
    hf_dir = make_hf(tmp_path / "hf", "mistral")
    convert("hf_to_mcore.py", hf_dir, tmp_path / "ours")
    write_imported_corpus(tmp_path / "ours", tmp_path / "text")
    result = run_pretrain([
        "--config-path", str(tmp_path / "ours"), "--config-name", "config",
        f"model.data.data_prefix=[{tmp_path / 'text'}]", "model.encoder_seq_length=32",
        "model.micro_batch_size=2", "model.global_batch_size=4", "trainer.max_steps=2",
        "model.optim.sched.warmup_steps=1", *QUIET,  # bf16-mixed on fp32 weights
        f"exp_manager.exp_dir={tmp_path / 'runs'}"])
    assert "initialised weights from" in result.stdout and "step 2/2" in result.stdout


def test_export_does_not_depend_on_the_training_layout(tmp_path, init_checkpoint):
    """A checkpoint of the same weights saved with TP=2 exports to exactly the same files as
    the TP=1 one (a PP=2 checkpoint stores the same global, layer-indexed tensors: its
    resharding is covered by test_parallel.py::test_resume_reshards_across_layouts, and the
    exporter reads tensors by global slices whatever wrote them)."""
    from safetensors.torch import load_file

    def export(ckpt, name):
        convert("mcore_to_hf.py", ckpt, tmp_path / name)
        index = json.loads((tmp_path / name / "model.safetensors.index.json").read_text())
        tensors = {}
        for file in set(index["weight_map"].values()):
            tensors.update(load_file(tmp_path / name / file))
        return tensors

    reference = export(init_checkpoint, "tp1")
    layouts = {"tp2": "model.tensor_model_parallel_size=2"}
    for name, layout in layouts.items():
        run_pretrain([*SMALL_MODEL, *QUIET, "trainer.precision=32", "trainer.max_steps=0",
                      "model.optim.sched.max_steps=10", "model.optim.sched.warmup_steps=2",
                      f"model.restore_from_path={init_checkpoint}", layout,
                      f"exp_manager.exp_dir={tmp_path}", f"exp_manager.name={name}"], nproc=2)
        saved = tmp_path / name / "checkpoints" / "step_00000000"
        meta = json.loads((saved / "danube_checkpoint.json").read_text())
        assert meta["layout"]["tp"] * meta["layout"]["pp"] == 2
        exported = export(saved, f"from_{name}")
        assert set(exported) == set(reference)
        assert all(torch.equal(exported[k], reference[k]) for k in reference), name
        # evaluation and generation load any layout into one process the same way
        from danube.inference.model import open_checkpoint

        tokens = torch.arange(3, 40).reshape(1, -1)
        with open_checkpoint(init_checkpoint, "32") as im:
            expected = im.logits(tokens)
        with open_checkpoint(saved, "32") as im:
            assert torch.equal(im.logits(tokens), expected), name


def test_1_8b_layouts_map_every_key_with_the_right_shape(megatron_world):
    """Danube's real layout, shapes only: every megatron checkpoint chunk the import writes
    comes from HF tensors with the right shape, every HF tensor is used, and the export maps
    each megatron layer back to HF's shapes."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from transformers import MistralConfig, MistralForCausalLM

    from danube.config.compose import compose_pretrain_config
    from danube.conversion.layout import FC1, LAYER_PREFIX, Geometry, hf_chunk, mcore_to_hf_layer
    from danube.model.builder import build_model_chunks, on_meta_device, transformer_config

    m = compose_pretrain_config("danube_1.8b").model
    with on_meta_device():
        hf = MistralForCausalLM(MistralConfig(
            vocab_size=32000, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_query_groups, sliding_window=m.window_size))
        ours = build_model_chunks(m, transformer_config(m, "bf16", False), 32000, False)[0]
    hf_tensors, used = dict(hf.state_dict()), set()

    def get(name):
        used.add(name)
        return hf_tensors[name]

    g = Geometry.of(m)
    layer0 = {}
    # One item per layer and key: keep one per key (and no extra state).
    by_key = {item.key: item for item in ours.sharded_state_dict().values()
              if isinstance(item, (ShardedTensor, ShardedTensorFactory))}
    for item in by_key.values():
        for layer in range(m.num_layers) if item.key.startswith(LAYER_PREFIX) else [None]:
            offset = (layer, 0, 0) if layer is not None else (0, 0)
            if item.key.endswith(FC1):  # gate and up halves, as megatron stores SwiGLU
                halves = [hf_chunk(item.key, (layer, half * m.ffn_hidden_size, 0), get, g)
                          for half in (0, 1)]
                chunk = torch.cat(halves)
            else:
                chunk = hf_chunk(item.key, offset, get, g)
            assert tuple(chunk.shape) == tuple(item.data.shape), item.key
            if layer == 0:
                layer0[item.key[len(LAYER_PREFIX) + 1:]] = chunk
    assert used == set(hf_tensors)  # every HF tensor lands somewhere
    back = mcore_to_hf_layer(layer0, g)
    assert {k: tuple(v.shape) for k, v in back.items()} == {
        k[len("model.layers.0."):]: tuple(v.shape) for k, v in hf_tensors.items()
        if k.startswith("model.layers.0.")}


def test_an_interrupted_import_leaves_no_output(tmp_path):
    """A damaged last shard (a download cut short) fails the import mid-way: no <out_dir>."""
    from transformers import MistralForCausalLM

    hf_dir = make_hf(tmp_path / "hf", "mistral")
    MistralForCausalLM.from_pretrained(hf_dir).save_pretrained(hf_dir, max_shard_size="40KB")
    (hf_dir / "model.safetensors").unlink(missing_ok=True)
    shards = sorted(hf_dir.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[-1].write_bytes(shards[-1].read_bytes()[:200])
    result = convert("hf_to_mcore.py", hf_dir, tmp_path / "ours", check=False)
    assert result.returncode != 0
    assert not (tmp_path / "ours").exists() and not (tmp_path / ".tmp-ours").exists()


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


CHAT = [{"role": "user", "content": "hello there"}]


def make_chatml_hf(path: Path, extra_rows: int) -> Path:
    """A ChatML-style instruct model as transformers 5 saves it: specials <|endoftext|>=0,
    <|im_start|>=1 (bos), <|im_end|>=2 (eos, pad), the template in chat_template.jinja, and
    `extra_rows` embedding rows beyond the tokenizer. Its LM head makes <|im_end|> win after a
    few greedy tokens after the CHAT prompt, so generation has a place to stop."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["user: hello there, how are you?", "assistant: fine, thanks."] * 50,
                           trainers.BpeTrainer(
                               vocab_size=300, show_progress=False,
                               special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    assert (path / "chat_template.jinja").is_file()  # where transformers 5 keeps it
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=hf.get_vocab_size() + extra_rows, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=2))
    prompt = torch.tensor([tok.apply_chat_template(CHAT, add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)])
    with torch.no_grad():
        third = model.generate(prompt, max_new_tokens=3, do_sample=False, eos_token_id=None)[0, -1]
        model.lm_head.weight[2] = 1.5 * model.lm_head.weight[third]
    model.save_pretrained(path)
    return path


def test_chatml_model_keeps_its_ids_template_and_rows(tmp_path):
    """HF -> danube -> HF of a ChatML instruct model whose config vocab exceeds its tokenizer:
    the same special-token ids, generation config and chat template; bit-identical weights
    (extra rows kept); greedy generation stops where the source's stops."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = make_chatml_hf(tmp_path / "hf", extra_rows=20)
    convert("hf_to_mcore.py", source, tmp_path / "ours")
    convert("mcore_to_hf.py", tmp_path / "ours" / "checkpoint", tmp_path / "back")
    back = tmp_path / "back"
    for name in ("config.json", "generation_config.json"):
        original, exported = (json.loads((d / name).read_text()) for d in (source, back))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "vocab_size"):
            if key in original:
                assert exported[key] == original[key], (name, key)
    template = [(d / "chat_template.jinja").read_text() for d in (source, back)]
    assert template[0] == template[1]
    rendered = [AutoTokenizer.from_pretrained(d).apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
        for d in (source, back)]
    assert rendered[0] == rendered[1] and rendered[0][0] == 1
    models = [AutoModelForCausalLM.from_pretrained(d) for d in (source, back)]
    original, exported = models[0].state_dict(), models[1].state_dict()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    prompt = torch.tensor([rendered[0]])
    outputs = [m.generate(prompt, max_new_tokens=12, do_sample=False)[0].tolist()
               for m in models]
    assert outputs[0][-1] == 2 and len(outputs[0]) < len(rendered[0]) + 12  # stopped at eos
    assert outputs[1] == outputs[0]


def test_tp1_checkpoint_of_vocab_32000_restores_at_tp4(tmp_path):
    """The padded vocabulary depends on the config alone: an imported TP=1 checkpoint (vocab
    32000) loads at TP=4 and gives the TP=1 logits, 32000 of them (megatron-LM's divisor x TP
    padding builds 32256 rows at TP=4: other logits, other exports, another optimizer state)."""
    hf_dir = make_hf(tmp_path / "hf", "llama", vocab_size=32000, num_key_value_heads=4)
    convert("hf_to_mcore.py", hf_dir, tmp_path / "ours")
    ckpt = tmp_path / "ours" / "checkpoint"
    helper = ROOT / "tests" / "helpers" / "checkpoint_logits.py"
    for tp in (1, 4):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tp}",
               f"--master_port={free_port()}", str(helper), str(ckpt), str(tp),
               str(tmp_path / f"tp{tp}.pt")]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-4000:]
    tp1, tp4 = torch.load(tmp_path / "tp1.pt"), torch.load(tmp_path / "tp4.pt")
    assert tp1.shape[-1] == 32000
    torch.testing.assert_close(tp4, tp1, rtol=1e-5, atol=1e-5)
