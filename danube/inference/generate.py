"""Text generation with megatron-core's inference engine (the static engine, KV cache).

megatron-core 0.16's `StaticInferenceEngine(legacy=True)` runs on CPU with `cpu_compat` (the
dynamic engine needs flash attention). What we make explicit, because megatron's defaults
surprise (see ../shared/notes/evaluation-anchors.md §4.2):
- greedy is `top_k=1` (megatron samples the full distribution by default); top-k and top-p
  cannot be combined there, so asking for both is refused before anything loads;
- BOS: prompts are tokenized here, with BOS only when asked (`add_bos`); megatron's own
  tokenization strips it;
- stop strings: the static engine stops only on the end-of-document token, so a stop string
  cuts the text afterwards (the answer ends before it);
- the seed: megatron's controller samples from a generator seeded by the model config (the
  engine's `random_seed` does not reach it), so `Sampling.seed` seeds that generator;
- megatron pads the vocabulary; padded rows are masked out of the logits so a sampled token is
  always a real one (the Hugging Face export has no such rows).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import torch

from danube.inference.model import InferenceError, InferenceModel


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0 = greedy (the default)."""
    top_k: int = 0
    top_p: float = 0.0
    seed: int = 1234
    stop: Sequence[str] = field(default_factory=tuple)
    add_bos: bool = False

    def problems(self) -> List[str]:
        out = []
        if self.max_new_tokens < 1:
            out.append(f"max_new_tokens={self.max_new_tokens}: generate at least 1 token")
        if self.temperature < 0:
            out.append(f"temperature={self.temperature}: use 0 for greedy, > 0 to sample")
        if self.top_k < 0 or not 0.0 <= self.top_p <= 1.0:
            out.append(f"top_k={self.top_k}, top_p={self.top_p}: top_k >= 0, 0 <= top_p <= 1")
        if self.top_k > 0 and self.top_p > 0:
            out.append("top_k and top_p together: megatron-core's sampler takes one or the other "
                       "(set the other to 0)")
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def megatron(self, termination_id: int):
        from megatron.core.inference.sampling_params import SamplingParams

        if self.greedy:
            return SamplingParams(temperature=1.0, top_k=1, top_p=0.0,
                                  num_tokens_to_generate=self.max_new_tokens,
                                  termination_id=termination_id)
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              num_tokens_to_generate=self.max_new_tokens,
                              termination_id=termination_id)


@dataclass
class Generation:
    prompt_tokens: List[int]
    tokens: List[int]  # generated, up to and including EOS when it came
    text: str  # generated text, cut before the first stop string, without EOS
    finish: str  # "eos" | "stop" | "length"


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple:
    """(text before the earliest stop string, whether one was found)."""
    cuts = [text.index(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def encode(im: InferenceModel, prompt: str, add_bos: bool) -> List[int]:
    ids = im.tokenizer.tokenize(prompt)
    if add_bos:
        if im.tokenizer.bos is None:
            raise InferenceError("add_bos asked for, but the tokenizer has no BOS token")
        ids = [im.tokenizer.bos] + ids
    return ids


@contextlib.contextmanager
def _real_vocab_only(im: InferenceModel) -> Iterator[None]:
    def hook(_module, _inputs, output):
        logits = output[0] if isinstance(output, tuple) else output
        logits[..., im.vocab:] = float("-inf")
        return output

    handle = im.gpt.output_layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """The static engine draws a tqdm bar per batch, which would cut into streamed text."""
    from functools import partial

    from megatron.core.inference.engines import static_engine

    original = static_engine.tqdm
    static_engine.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        static_engine.tqdm = original


class _StopAtEos:
    """The tokenizer as megatron's text generation controller sees it: it ends a request at
    `tokenizer.eod` (the static path ignores SamplingParams.termination_id), so `eod` here is
    the model's own EOS / end of turn (<|im_end|>, <|eot_id|>), not the pretraining data's
    document separator."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eod = tokenizer.eos

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def _engine(im: InferenceModel, batch: int, max_seq_length: int, seed: int):
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.engines import StaticInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
        GPTInferenceWrapper,
    )
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
        InferenceWrapperConfig,
    )
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    config = InferenceWrapperConfig(
        hidden_size=im.config.hidden_size,
        params_dtype=torch.bfloat16 if im.precision == "bf16" else torch.float32,
        inference_batch_times_seqlen_threshold=-1,  # PP=1: no micro-batched prefill
        padded_vocab_size=im.gpt.vocab_size,
        inference_max_requests=batch,
        inference_max_seq_length=max_seq_length,
    )
    context = StaticInferenceContext.from_config(config)
    wrapped = GPTInferenceWrapper(im.model, config, context)
    controller = TextGenerationController(wrapped, _StopAtEos(im.tokenizer))
    # the controller samples from its own generator, seeded from the model config's
    # `inference_sampling_seed` (42); the engine's `random_seed` seeds only torch's global one
    # (and only in `generate`, not in `run_engine`): without this every seed samples alike
    controller.sampling_rng.manual_seed(seed)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the static engine will be deprecated"
        return StaticInferenceEngine(controller, max_batch_size=batch, random_seed=seed,
                                     legacy=True)


def _text_stream(on_text: Callable[[str], None], stop: Sequence[str]):
    """An AsyncStream the engine's run loop accepts, printing each new piece of the answer as
    it grows (megatron re-decodes the whole answer every step, so SentencePiece's spaces come
    out right), holding back what could be the start of a stop string."""
    from megatron.core.inference.async_stream import AsyncStream

    class TextStream(AsyncStream):
        def __init__(self):
            self._finished = False
            self.shown = 0
            self.stopped = False

        def put(self, item) -> None:
            if self._finished or self.stopped or isinstance(item, BaseException):
                return
            text, found = cut_at_stop(item.generated_text or "", stop)
            self.stopped = found
            hold = 0 if found else max((len(s) - 1 for s in stop if s), default=0)
            visible = len(text) - hold
            if visible > self.shown:
                on_text(text[self.shown:visible])
                self.shown = visible

        def flush(self, final: str) -> None:
            if len(final) > self.shown:
                on_text(final[self.shown:])
                self.shown = len(final)

        def finish(self, exception=None) -> None:
            self._finished = True

    return TextStream()


class Cancelled(Exception):
    """Raised out of `generate` when `cancelled()` turned true for every prompt of the batch
    being generated (their clients went away)."""


@contextlib.contextmanager
def _cancellable(im: InferenceModel, cancelled: Optional[Callable[[], bool]]) -> Iterator[None]:
    """Checks `cancelled()` before every forward step of the model (prefill and each decoded
    token); the static engine has no abort of its own."""
    if cancelled is None:
        yield
        return

    def check(_module, _args):
        if cancelled():
            raise Cancelled()

    handle = im.gpt.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def generate(im: InferenceModel, prompts: Sequence, sampling: Sampling, batch: int = 8,
             on_texts: Optional[Sequence[Optional[Callable[[str], None]]]] = None,
             cancelled: Optional[Callable[[], bool]] = None) -> List[Generation]:
    """Prompts (strings, or token id lists used as given) -> generations, in order.
    `on_texts` (one callable or None per prompt) streams each answer as it is generated.
    `cancelled()` true stops the work with `Cancelled` (when it is checked, the caller has
    decided every prompt in flight is unwanted)."""
    problems = sampling.problems()
    if problems:
        raise InferenceError("; ".join(problems))
    ids = [list(p) if not isinstance(p, str) else encode(im, p, sampling.add_bos)
           for p in prompts]
    longest = max(len(p) for p in ids) + sampling.max_new_tokens
    if longest > im.config.max_position_embeddings:
        raise InferenceError(
            f"prompt + max_new_tokens = {longest} tokens > the model's "
            f"max_position_embeddings {im.config.max_position_embeddings}: shorten the prompt or "
            "lower max_new_tokens")
    if any(len(p) == 0 for p in ids):
        raise InferenceError("an empty prompt: give at least one token (or add_bos)")
    # the model's own end of sequence / end of turn (<|im_end|>, <|eot_id|>), not the
    # pretraining data's document separator
    eod = im.tokenizer.eos
    results: List[Generation] = []
    on_texts = list(on_texts or [None] * len(ids))
    with _real_vocab_only(im), _cancellable(im, cancelled):
        for start in range(0, len(ids), batch):
            chunk = ids[start: start + batch]
            engine = _engine(im, len(chunk), longest, sampling.seed)
            params = sampling.megatron(eod)
            request_ids, streams = [], []
            for n, tokens in enumerate(chunk):
                rid = engine.scheduler.add_request(
                    prompt=im.tokenizer.detokenize(tokens), prompt_tokens=tokens,
                    sampling_params=params)
                stream = None
                if on_texts[start + n] is not None:
                    stream = _text_stream(on_texts[start + n], sampling.stop)
                    engine.scheduler.streams[rid] = stream
                request_ids.append(rid)
                streams.append(stream)
            with _no_progress_bar():
                engine.run_engine()
            for rid, tokens in zip(request_ids, chunk):
                done = engine.scheduler.completed_request_pool[rid]
                out = [int(t) for t in done.generated_tokens]
                # megatron counts the terminating EOS out of the generated length: a request
                # that ended early ended on it (kept, as transformers keeps it)
                if len(out) < sampling.max_new_tokens and (not out or out[-1] != eod):
                    out.append(eod)
                body = out[:-1] if out and out[-1] == eod else out
                text, found = cut_at_stop(im.tokenizer.detokenize(body), sampling.stop)
                finish = "stop" if found else "eos" if out and out[-1] == eod else "length"
                results.append(Generation(tokens, out, text, finish))
            for stream, result in zip(streams, results[start:]):
                if stream is not None:
                    stream.flush(result.text)
    return results
