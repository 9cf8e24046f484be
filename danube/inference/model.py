"""A danube checkpoint as one model in one process, for scoring and generation.

Any saved TP/PP layout loads (megatron's dist_checkpointing reshards to TP=PP=1); adapters of
a LoRA checkpoint are folded into the base weights, as the Hugging Face export does, so the
native model and the export compute the same function. Logits come back over the real
vocabulary only (megatron pads the embedding to a multiple of `make_vocab_size_divisible_by`;
the export drops those rows), in fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, List, Optional

import torch
from megatron.core import tensor_parallel

from danube.config.compose import load_model_config
from danube.config.schema import ModelConfig, PeftConfig
from danube.data.tokenizer import Tokenizer, load_tokenizer
from danube.paths import CONFIG_FILE, TOKENIZER_DIR, checkpoint_problem, latest_checkpoint


class InferenceError(ValueError):
    pass


@dataclass
class InferenceModel:
    model: torch.nn.Module  # a GPTModel (or Float16Module around one), eval mode
    tokenizer: Tokenizer
    config: ModelConfig
    vocab: int  # rows that are real tokens
    device: torch.device
    precision: str  # "32" or "bf16"
    path: Optional[Path] = None

    @property
    def max_length(self) -> int:
        """The longest sequence scored in one window (lm-eval's `max_length`: HF takes it from
        `max_position_embeddings`, which is what the export writes)."""
        return self.config.max_position_embeddings

    @property
    def gpt(self):
        """The GPTModel itself (under Float16Module when bf16)."""
        return getattr(self.model, "module", self.model)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """[b, s] token ids -> [b, s, vocab] fp32 logits (causal, no padding mask: pad on the
        right, the padded positions cannot reach earlier ones). With `positions` [b, k]: the
        logits at those positions only, [b, k, vocab]; the LM head and softmax then run on
        b x k rows instead of b x s (scoring needs the continuation's few positions)."""
        tokens = tokens.to(self.device)
        position_ids = torch.arange(tokens.shape[1], device=self.device).expand_as(tokens)
        hook = None
        if positions is not None:
            index = positions.to(self.device).t()  # [k, b]

            def only_positions(_module, args, kwargs):
                hidden = args[0]  # [s, b, h]
                picked = hidden.gather(0, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
                return (picked, *args[1:]), kwargs

            hook = self.gpt.output_layer.register_forward_pre_hook(only_positions,
                                                                   with_kwargs=True)
        try:
            out = self.model(tokens, position_ids, None)
        finally:
            if hook is not None:
                hook.remove()
        out = tensor_parallel.gather_from_tensor_model_parallel_region(out)
        return out[..., : self.vocab].float()


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, a run/checkpoints directory (its newest checkpoint), or the
    output directory of conversion/hf_to_mcore.py (its checkpoint/)."""
    path = Path(path)
    if (path / "checkpoint").is_dir() and checkpoint_problem(path / "checkpoint") is None:
        return path / "checkpoint"
    for root in (path, path / "checkpoints"):
        if root.is_dir() and checkpoint_problem(root) is None:
            return root
        if root.is_dir():
            latest = latest_checkpoint(root)
            if latest is not None:
                return latest
    raise InferenceError(
        f"{path} is not a danube checkpoint, a run directory with checkpoints/ or an imported "
        "model (give e.g. results/danube_tiny, results/danube_tiny/checkpoints/step_00000200 "
        "or the output directory of conversion/hf_to_mcore.py)")


def _single_layout(model: ModelConfig) -> ModelConfig:
    return replace(model, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                   virtual_pipeline_model_parallel_size=None, context_parallel_size=1,
                   sequence_parallel=False)


def _peft(path: Path) -> Optional[PeftConfig]:
    from omegaconf import OmegaConf

    from danube.training.checkpoint import checkpoint_has_adapters

    if not checkpoint_has_adapters(path):
        return None
    section = OmegaConf.load(path / CONFIG_FILE).model.get("peft")
    merged = OmegaConf.merge(OmegaConf.structured(PeftConfig), section)
    return OmegaConf.to_object(merged)


def build_inference_model(path: Path, precision: str, cuda: bool) -> InferenceModel:
    """Inside an initialised single-process world: build, load, merge adapters, eval mode."""
    from megatron.core.transformer.module import Float16Module

    from danube.model.builder import build_model_chunks, transformer_config, uses_transformer_engine
    from danube.model.lora import lora_modules, merge_and_restart
    from danube.training.checkpoint import load_checkpoint, lora_scale

    tokenizer = load_tokenizer(path / TOKENIZER_DIR)
    model_cfg = _single_layout(load_model_config(path / CONFIG_FILE))
    use_te = uses_transformer_engine(model_cfg)
    config = transformer_config(model_cfg, precision, use_te)
    peft = _peft(path)
    chunks = build_model_chunks(model_cfg, config, tokenizer.vocab_size, use_te, peft)
    load_checkpoint(path, chunks)
    if peft is not None:  # W + scale B A, then adapters that add exactly nothing, switched off
        zeros = [(torch.zeros_like(m.lora_a), torch.zeros_like(m.lora_b))
                 for m in lora_modules(chunks)]
        merge_and_restart(chunks, lora_scale(path), zeros)
        for module in lora_modules(chunks):
            module.enabled = False
    model = chunks[0]
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    if cuda:
        model.cuda()
    if config.bf16:
        model = Float16Module(config, model)
    model.eval()
    return InferenceModel(model, tokenizer, model_cfg,
                          model_cfg.vocab_size or tokenizer.vocab_size, device,
                          "bf16" if config.bf16 else "32", path)


@contextlib.contextmanager
def open_checkpoint(path: Path, precision: str = "auto", accelerator: str = "auto"
                    ) -> Iterator[InferenceModel]:
    """The checkpoint (or a run's newest) as an InferenceModel, in a one-process world that
    is torn down on exit. precision: auto (bf16 where the machine runs it natively), 32, bf16."""
    from danube.config.derived import normalized_precision
    from danube.runtime import quiet_engine_notices, resolve_precision, use_cuda
    from danube.training.distributed import single_process_world

    quiet_engine_notices()
    path = resolve_checkpoint(path)
    if not (path / TOKENIZER_DIR / "tokenizer.json").is_file():
        raise InferenceError(f"{path} has no {TOKENIZER_DIR}/tokenizer.json: it was not "
                             "written by danube (re-save it, or import the HF model with "
                             "conversion/hf_to_mcore.py)")
    cuda = use_cuda(accelerator)
    chosen = normalized_precision(resolve_precision(precision, cuda).precision)
    if torch.distributed.is_initialized():  # a caller's one-process world (tests, notebooks)
        if torch.distributed.get_world_size() != 1:
            raise InferenceError("open_checkpoint runs in one process; run it outside "
                                 "torchrun (or score in the loop: model.downstream_eval)")
        world = contextlib.nullcontext()
    else:
        world = single_process_world("gpu" if cuda else "cpu")
    with world:
        yield build_inference_model(path, chosen, cuda)


def from_training(chunks: List[torch.nn.Module], tokenizer: Tokenizer, model: ModelConfig,
                  device: torch.device, precision: str) -> InferenceModel:
    """The model being trained (PP=1; any TP), unwrapped from DDP, for in-loop scoring."""
    inner = chunks[0]
    inner = getattr(inner, "module", inner)  # DDP -> Float16Module or GPTModel
    return InferenceModel(inner, tokenizer, model, model.vocab_size or tokenizer.vocab_size,
                          device, precision)
