"""lm-evaluation-harness's model interface over a danube checkpoint (no export needed).

The request semantics are the Hugging Face backend's (lm_eval/models/huggingface.py), so a
checkpoint and its export score the same, request by request (tests/test_evaluation.py):
- log-likelihood: the input is (context + continuation)[-(max_length + 1):][:-1]; batches
  are sorted by length, right-padded with no mask (a causal model's earlier positions cannot
  see the padding, so batch size changes a score only by float rounding); the LM head and the
  softmax run only at the continuation's positions (HF's backend: at every position);
- rolling log-likelihood: lm-eval's disjoint windows of `max_length` with one token of context,
  the first token conditioned on the prefix token;
- BOS, pinned: `add_bos` (default off: danube's data preparation never puts BOS in front of a
  document). Off, contexts are encoded without special tokens and the prefix token of empty
  contexts and rolling windows is EOS, as lm-eval <= 0.4.8 did; on, every encoding starts with
  BOS and BOS is the prefix token. The HF path gets the same through `add_bos_token` and
  `prefix_token_id`;
- generation: megatron-core's engine (danube.inference.generate), greedy unless the task asks
  to sample, cut at the task's `until` strings.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from danube.inference.model import InferenceModel


class DanubeLM(TemplateLM):
    def __init__(self, model: InferenceModel, batch_size: int = 8, add_bos: bool = False,
                 max_gen_toks: int = 256):
        super().__init__()
        self.im = model
        self.batch_size = int(batch_size)
        self.add_bos = add_bos
        self.max_gen_toks = max_gen_toks
        if add_bos and model.tokenizer.bos is None:
            raise ValueError("add_bos: the tokenizer has no BOS token")

    # --- the TemplateLM contract -----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.im.tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        return self.im.tokenizer.bos if self.add_bos else self.im.tokenizer.eod

    @property
    def max_length(self) -> int:
        return self.im.max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   **_kwargs) -> List[int]:
        ids = self.im.tokenizer.tokenize(string)
        special = self.add_bos if add_special_tokens is None else add_special_tokens
        return [self.im.tokenizer.bos] + ids if special and self.add_bos else ids

    def tok_decode(self, tokens) -> str:
        return self.im.tokenizer.detokenize(tokens)

    # --- scoring -----------------------------------------------------------------------------
    def _score(self, pieces: List[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum log p(continuation), greedy?), batched by
        length (longest first), right-padded."""
        inputs, lengths = [], []
        for context, continuation in pieces:
            whole = (context + continuation)[-(self.max_length + 1):]
            inputs.append(whole[:-1])
            lengths.append(len(continuation))
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(inputs)
        for start in range(0, len(order), self.batch_size):
            rows = order[start: start + self.batch_size]
            width = max(len(inputs[i]) for i in rows)
            keep = max(lengths[i] for i in rows)  # the continuation positions, right-aligned
            batch = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
            positions = torch.zeros((len(rows), keep), dtype=torch.long)
            for r, i in enumerate(rows):
                end = len(inputs[i])
                batch[r, :end] = torch.tensor(inputs[i])
                positions[r] = torch.arange(end - keep, end).clamp(min=0)
            log_probs = F.log_softmax(self.im.logits(batch, positions), dim=-1).cpu()
            for r, i in enumerate(rows):
                count = lengths[i]
                target = torch.tensor(pieces[i][1][-count:], dtype=torch.long)
                scores = log_probs[r, keep - count:]
                total = scores.gather(-1, target.unsqueeze(-1)).sum()
                results[i] = (float(total), bool((scores.argmax(-1) == target).all()))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_kwargs):
        results = self._score([(context, continuation) for _, context, continuation in requests])
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        out = []
        for request in requests:
            (string,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(score for score, _ in self._score(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # --- generation --------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        from danube.inference.generate import Sampling, generate

        out = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            sampling = Sampling(
                max_new_tokens=int(kwargs.pop("max_gen_toks", self.max_gen_toks)),
                temperature=temperature, top_k=int(kwargs.pop("top_k", 0) or 0),
                top_p=float(kwargs.pop("top_p", 0.0) or 0.0), stop=until)
            prompt = self.tok_encode(context)[-(self.max_length - sampling.max_new_tokens):]
            text = generate(self.im, [prompt], sampling)[0].text
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out
