"""Per-token log-probabilities of whole sequences: what an OpenAI-style `logprobs` answer
carries (`echo` scores the prompt too).

One causal forward pass per batch of sequences, right-padded (a position cannot see the
padding after it, so a row's numbers do not depend on its neighbours beyond float rounding),
log-softmax over the real vocabulary in fp32: the same numbers as the native lm-eval backend
(danube/evaluation/lm.py), which scores only the continuation's positions of the same pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from danube.inference.model import InferenceModel

MAX_LOGIT_ELEMENTS = 1 << 28  # 1 GiB of fp32 logits (and as much again for log-softmax)


@dataclass
class Scored:
    token_logprobs: List[Optional[float]]
    """log p(token i | tokens < i) for every token; None for the first (nothing before it)."""
    top: List[Optional[List[Tuple[int, float]]]]
    """The `top_n` most likely (id, logprob) at every position; None for the first."""
    next_logprobs: torch.Tensor
    """[vocab] log-probabilities of the token after the last one."""


@torch.no_grad()
def score(im: InferenceModel, sequences: Sequence[Sequence[int]], top_n: int = 0,
          batch: int = 8) -> List[Scored]:
    """Sequences (token ids, each at most the model's context) -> their per-token scores, in
    order. Batches are formed longest first, right-padded with the end-of-document token."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out: List[Optional[Scored]] = [None] * len(sequences)
    pad = im.tokenizer.eod
    start = 0
    while start < len(order):
        # at most `batch` rows, and no more fp32 logits than MAX_LOGIT_ELEMENTS (a 4k context
        # over a 32k vocabulary is 0.5 GB a row)
        width = len(sequences[order[start]])
        fit = max(1, MAX_LOGIT_ELEMENTS // (width * im.vocab))
        rows = order[start: start + min(batch, fit)]
        start += len(rows)
        tokens = torch.full((len(rows), width), pad, dtype=torch.long)
        for r, i in enumerate(rows):
            tokens[r, : len(sequences[i])] = torch.tensor(list(sequences[i]), dtype=torch.long)
        log_probs = F.log_softmax(im.logits(tokens), dim=-1).cpu()
        for r, i in enumerate(rows):
            ids = torch.tensor(list(sequences[i]), dtype=torch.long)
            n = len(ids)
            picked = log_probs[r, : n - 1].gather(-1, ids[1:].unsqueeze(-1)).squeeze(-1)
            top: List[Optional[List[Tuple[int, float]]]] = [None]
            if top_n > 0:
                values, indices = log_probs[r, : n - 1].topk(top_n, dim=-1)
                top += [list(zip(ix.tolist(), vs.tolist())) for ix, vs in zip(indices, values)]
            else:
                top += [[] for _ in range(n - 1)]
            out[i] = Scored([None] + picked.tolist(), top, log_probs[r, n - 1].clone())
    return out  # type: ignore[return-value]
