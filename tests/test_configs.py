"""Every shipped YAML composes and validates; the 1.8B layouts have the published size."""

from __future__ import annotations

import pytest
from hydra.errors import HydraException
from omegaconf.errors import ConfigKeyError, ValidationError

from danube.config.compose import CONFIG_DIR, compose_pretrain_config
from danube.config.validate import validate

CONFIG_NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_the_four_documented_configs_ship():
    assert {"danube_tiny", "danube_1.8b", "danube2_1.8b", "tinyllama_1.1b"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_composes_and_validates(name):
    cfg = compose_pretrain_config(name)
    assert cfg.name == name
    assert validate(cfg) == []


def test_danube_1_8b_carries_the_published_recipe():
    m = compose_pretrain_config("danube_1.8b").model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size) == (24, 2560, 6912)
    assert (m.num_attention_heads, m.num_query_groups) == (32, 8)
    assert (m.window_size, m.max_position_embeddings, m.rotary_base) == (4096, 16384, 10000)
    assert (m.normalization, m.layernorm_epsilon, m.activation) == ("rmsnorm", 1e-5, "fast-swiglu")
    assert not m.bias and not m.share_embeddings_and_output_weights
    assert m.fp8 and m.fp8_hybrid and not m.fp8_e4m3
    assert (m.optim.lr, m.optim.sched.min_lr, m.optim.weight_decay) == (2e-4, 1e-5, 0.1)
    assert m.optim.betas == [0.9, 0.95]
    # the report's ramp: 700B tokens at 2048, 100B each at 4096, 8192, 16384, 1.18M per step
    stages = [(s.tokens, s.encoder_seq_length, s.global_batch_size) for s in m.seq_length_stages]
    assert stages == [(700e9, 2048, 576), (100e9, 4096, 288), (100e9, 8192, 144),
                      (100e9, 16384, 72)]
    assert m.encoder_seq_length == 16384
    assert all(abs(g * n - 1.18e6) < 0.01e6 for _, n, g in stages)
    assert compose_pretrain_config("danube_1.8b").trainer.max_steps == 593398 + 3 * 84772


def test_danube2_drops_the_window_and_keeps_the_body():
    d1, d2 = (compose_pretrain_config(n).model for n in ("danube_1.8b", "danube2_1.8b"))
    assert d2.window_size is None and d2.max_position_embeddings == 8192
    assert (d2.num_layers, d2.hidden_size, d2.num_query_groups) == (
        d1.num_layers, d1.hidden_size, d1.num_query_groups)


def test_tinyllama_recipe():
    cfg = compose_pretrain_config("tinyllama_1.1b")
    m = cfg.model
    shape = (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_query_groups)
    assert shape == (22, 2048, 5632, 4)
    assert (m.encoder_seq_length, m.optim.lr, m.optim.sched.warmup_steps) == (2048, 4e-4, 2000)


def test_unknown_key_fails_at_composition():
    with pytest.raises((HydraException, ConfigKeyError)) as info:
        compose_pretrain_config("danube_tiny", ["model.num_layerz=3"])
    assert "num_layerz" in str(info.value)


def test_wrong_type_fails_at_composition():
    with pytest.raises((HydraException, ValidationError)) as info:
        compose_pretrain_config("danube_tiny", ["model.hidden_size=wide"])
    assert "hidden_size" in str(info.value)


def test_overrides_and_interpolation():
    cfg = compose_pretrain_config("danube_tiny", ["model.encoder_seq_length=128"])
    assert cfg.model.data.seq_length == 128


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,published", [
    ("danube_1.8b", 1.83e9), ("danube2_1.8b", 1.83e9), ("tinyllama_1.1b", 1.10e9)])
def test_big_layouts_on_meta_device_match_hf(megatron_world, name, published):
    """Our megatron GPTModel has exactly as many parameters as HF's Mistral/Llama of the same
    shape (32000-token vocabulary), and that is the published size."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from danube.model.builder import build_model_chunks, on_meta_device, transformer_config

    m = compose_pretrain_config(name).model
    with on_meta_device():
        ours = build_model_chunks(m, transformer_config(m, "bf16", use_te=False), 32000, False)[0]
        hf = MistralForCausalLM(MistralConfig(
            vocab_size=32000, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_query_groups, tie_word_embeddings=False))
    assert all(p.device.type == "meta" for p in ours.parameters())
    assert _count(ours) == _count(hf)
    assert abs(_count(ours) - published) / published < 0.01
    qkv = ours.decoder.layers[0].self_attention.linear_qkv.weight
    head_dim = m.hidden_size // m.num_attention_heads
    assert qkv.shape == ((m.num_attention_heads + 2 * m.num_query_groups) * head_dim, m.hidden_size)
    fc1 = ours.decoder.layers[0].mlp.linear_fc1.weight
    assert fc1.shape == (2 * m.ffn_hidden_size, m.hidden_size)  # gate and up, fused
    assert torch.device("meta") == ours.output_layer.weight.device


# The mandatory keys, and what the launcher reads from the starting checkpoint (H2O-Danube's
# 16k context) before validating.
SFT_NEEDS = {"danube_1.8b_chat_sft": ["model.restore_from_path=/ckpt",
                                      "model.data.train_ds.file_path=/data/train.jsonl",
                                      "model.max_position_embeddings=16384"]}


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIG_DIR / "sft").glob("*.yaml")))
def test_sft_configs_compose_and_validate(name):
    from danube.config.compose import compose_sft_config

    cfg = compose_sft_config(name, SFT_NEEDS.get(name, []))
    assert cfg.name == name and cfg.model.answer_only_loss
    assert validate(cfg) == []


def test_danube_chat_sft_carries_the_recipe():
    from danube.config.compose import compose_sft_config

    cfg = compose_sft_config("danube_1.8b_chat_sft", SFT_NEEDS["danube_1.8b_chat_sft"])
    assert (cfg.trainer.max_epochs, cfg.trainer.max_steps) == (1, -1)
    assert (cfg.model.optim.lr, cfg.model.optim.sched.name) == (1e-5, "CosineAnnealing")
    assert cfg.model.data.chat and cfg.model.data.chat_prompt_tokens is None
    assert not cfg.model.data.train_ds.add_bos


DPO_NEEDS = {"danube_1.8b_chat_dpo": ["model.restore_from_path=/ckpt",
                                      "model.data.data_prefix.train=/data/train.jsonl",
                                      "model.max_position_embeddings=16384"]}


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIG_DIR / "dpo").glob("*.yaml")))
def test_dpo_configs_compose_and_validate(name):
    from danube.config.compose import compose_dpo_config

    cfg = compose_dpo_config(name, DPO_NEEDS.get(name, []))
    assert cfg.name == name and cfg.model.dpo.preference_loss == "dpo"
    assert cfg.model.dpo.sft_average_log_probs == cfg.model.dpo.preference_average_log_probs
    assert validate(cfg) == []


def test_danube_chat_dpo_carries_the_recipe():
    """H2O-Danube's DPO: beta 0.2, LoRA r=4 alpha=16 on every linear, lr 1e-5."""
    from danube.config.compose import compose_dpo_config

    cfg = compose_dpo_config("danube_1.8b_chat_dpo", DPO_NEEDS["danube_1.8b_chat_dpo"])
    lora = cfg.model.peft.lora_tuning
    assert cfg.model.dpo.ref_policy_kl_penalty == 0.2 and cfg.model.optim.lr == 1e-5
    assert (cfg.model.peft.peft_scheme, lora.adapter_dim, lora.alpha) == ("lora", 4, 16)
    assert len(lora.target_modules) == 4


def test_the_shipped_lora_config_runs_where_transformer_engine_exists():
    """danube_1.8b_chat_dpo trains LoRA adapters, which wrap megatron's local linears:
    preflight on a GPU machine with TE would refuse it unless the config says
    transformer_engine: false (it does, with the reason)."""
    from danube.config.compose import compose_dpo_config
    from danube.config.preflight import Machine, preflight

    cfg = compose_dpo_config("danube_1.8b_chat_dpo", DPO_NEEDS["danube_1.8b_chat_dpo"])
    assert cfg.model.peft.peft_scheme == "lora" and not cfg.model.transformer_engine
    gpu = Machine(world_size=8, cuda=True, transformer_engine=True)
    assert not [p for p in preflight(cfg, gpu) if "peft_scheme=lora" in p]


def test_lora_alpha_null_is_nemo_s_scale_one(megatron_world):
    from danube.config.schema import LoraTuningConfig, ModelConfig, PeftConfig
    from danube.model.builder import build_model_chunks, transformer_config
    from danube.model.lora import lora_modules

    m = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                    num_query_groups=2)
    for alpha, rank, scale in ((None, 8, 1.0), (None, 2, 1.0), (16.0, 4, 4.0)):
        peft = PeftConfig(peft_scheme="lora",
                          lora_tuning=LoraTuningConfig(adapter_dim=rank, alpha=alpha))
        chunks = build_model_chunks(m, transformer_config(m, "32", False), 100, False, peft)
        assert {module.scale for module in lora_modules(chunks)} == {scale}


@pytest.mark.parametrize("position", ["pre", "post"])
def test_lora_dropout_position_is_where_the_mask_applies(megatron_world, position):
    """lora_tuning.dropout_position (NeMo's key): `pre` drops the adapter's input (PEFT),
    `post` its output (NeMo's default): one adapted linear's train-mode forward equals
    base + s B A (x * mask) for pre and base + mask * (s B A x) for post, the mask drawn
    from the same seed."""
    import torch

    from danube.config.schema import LoraTuningConfig, ModelConfig, PeftConfig
    from danube.model.builder import build_model_chunks, transformer_config
    from danube.model.lora import lora_modules

    m = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                    num_query_groups=2)
    peft = PeftConfig(peft_scheme="lora", lora_tuning=LoraTuningConfig(
        adapter_dim=4, adapter_dropout=0.5, dropout_position=position))
    module = lora_modules(build_model_chunks(m, transformer_config(m, "32", False), 100,
                                             False, peft))[0]
    with torch.no_grad():
        module.lora_b.normal_(0, 1.0)
    module.train()
    x = torch.randn(3, 2, 32)
    torch.manual_seed(7)
    out, _ = module(x)
    base, _ = module.base(x)
    torch.manual_seed(7)
    mask = torch.nn.functional.dropout(torch.ones(3, 2, x.shape[-1] if position == "pre"
                                                  else base.shape[-1]), 0.5, True)
    if position == "pre":
        want = base + module.scale * ((x * mask) @ module.lora_a.T) @ module.lora_b.T
    else:
        want = base + mask * (module.scale * (x @ module.lora_a.T) @ module.lora_b.T)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
