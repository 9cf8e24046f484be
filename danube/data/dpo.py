"""DPO data: JSONL preference pairs -> tokenized pairs -> global batches (packed or not) ->
this rank's micro-batches.

Formats (one JSON object per line):
    {"prompt": str, "chosen_response": str, "rejected_response": str}     NeMo-Aligner, string
    {"prompt": [messages], "chosen_response": {message}, "rejected_response": {message}}
                                                                          Aligner, messages
    {"prompt": str | [messages], "chosen": str | [messages], "rejected": ...}   TRL
    {"chosen": [messages], "rejected": [messages]}            TRL, implicit (shared prefix)
with optional "chosen_reward" / "rejected_reward" (rpo_* losses).

Tokenization is segment by segment (as H2O LLM Studio does): the prompt's ids, then each
response's ids, so the prompt is exactly the same ids at the start of both sequences. Message
prompts are rendered by the chat template with the generation prompt (`<|answer|>`), and a
response is the rest of rendering prompt + response, so it ends with the template's
end-of-turn token (`</s>`), which is trained. String responses get the end-of-sequence token
when they lack it (`append_eod`). Where tokenizing prompt + response as one string would
give other ids (a merge across the boundary) the pair is counted (`joint_differs`) and the
dry run shows it.

A pair with a sequence longer than `seq_length` positions is masked: it stays in the data
order (so every layout sees the same global batches) but never enters a row, the loss or a
mean; each step counts its masked pairs.

Rows: unpacked, a pair is two rows of `seq_length` (chosen, then rejected) and a micro-batch is
`micro_batch_size` pairs; packed, pairs are packed whole (first-fit decreasing) into rows of
2 x seq_length, chosen then rejected, every sequence isolated by a block-diagonal mask, and a
micro-batch is `micro_batch_size` rows. Either way the sequences of a micro-batch are numbered
in row order, so sequence 2k is pair k's chosen and 2k+1 its rejected.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from danube.data.chat import ChatDataError, ChatTemplate, check_messages, read_jsonl
from danube.data.sft import SFTSample, collate_rows, pack_rows
from danube.data.tokenizer import Tokenizer


@dataclass
class DPOPair:
    chosen: SFTSample
    rejected: SFTSample
    rewards: Tuple[float, float]
    where: str
    prompt_tokens: int
    masked: bool = False
    """Longer than seq_length: out of the loss and every mean."""
    joint_differs: Optional[int] = None
    """Where tokenizing prompt + response as one string gives other ids than segment by
    segment: the first differing token's index in the sequence (None: nowhere)."""

    @property
    def positions(self) -> int:
        return self.chosen.positions + self.rejected.positions


@dataclass
class DPODataset:
    pairs: List[DPOPair]
    stats: Dict[str, int] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)

    def digest(self) -> str:
        """sha256 of every pair's ids, trained masks and whether it is masked out (longer than
        seq_length), in order (the cache key's data part): the templates, the tokenizer,
        append_eod and seq_length all change it."""
        h = hashlib.sha256()
        for pair in self.pairs:
            h.update(b"M" if pair.masked else b"V")
            for sample in (pair.chosen, pair.rejected):
                h.update(np.int64(len(sample.ids)).tobytes())
                h.update(sample.ids.astype(np.int64).tobytes())
                h.update(np.packbits(sample.trained).tobytes())
        return h.hexdigest()

    @property
    def valid(self) -> int:
        return sum(not p.masked for p in self.pairs)


def _messages(value, where: str, what: str) -> List[dict]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ChatDataError(f"{where}: {what} must be a string, a message {{role, content}} or "
                            "a list of messages")
    check_messages(value, f"{where}: {what}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def pair_texts(record: dict, where: str, template: Optional[ChatTemplate]
               ) -> Tuple[str, str, str, bool]:
    """(prompt text, chosen text, rejected text, string form) of a record in any format."""
    if "chosen_response" in record or "rejected_response" in record:
        keys = ("chosen_response", "rejected_response")
    elif "chosen" in record or "rejected" in record:
        keys = ("chosen", "rejected")
    else:
        raise ChatDataError(f"{where}: a preference pair needs chosen_response/rejected_response "
                            f"(NeMo-Aligner) or chosen/rejected (TRL); found keys "
                            f"{sorted(record)}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ChatDataError(f"{where}: missing {', '.join(missing)}")
    prompt, chosen, rejected = record.get("prompt"), record[keys[0]], record[keys[1]]
    if prompt is None:  # TRL's implicit prompt: the messages both conversations share
        chosen = _messages(chosen, where, keys[0])
        rejected = _messages(rejected, where, keys[1])
        shared = 0
        while (shared < min(len(chosen), len(rejected)) - 1
               and chosen[shared] == rejected[shared]):
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise ChatDataError(f"{where}: no 'prompt' and the two conversations share no "
                                "leading messages")
    if isinstance(prompt, str):
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise ChatDataError(f"{where}: with a string prompt the responses must be strings")
        return prompt, chosen, rejected, True
    prompt = _messages(prompt, where, "prompt")
    if template is None:
        raise ChatDataError(f"{where}: message-form pairs need a chat template")
    before = template.render(prompt, add_generation_prompt=True)
    texts = []
    for key, response in zip(keys, (chosen, rejected)):
        response = [{"role": "assistant", "content": response}] if isinstance(response, str) \
            else _messages(response, where, key)
        full = template.render(prompt + response)
        if not full.startswith(before):
            raise ChatDataError(f"{where}: the chat template does not render the prompt as a "
                                "prefix of prompt + response, so the response cannot be located")
        # as SFT trains it: the response through its end-of-turn token, not the whitespace
        # the template writes after it (generation stops at the token)
        texts.append(full[len(before):].rstrip())
    return before, texts[0], texts[1], False


def _first_difference(a, b) -> Optional[int]:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def encode_pair(record: dict, where: str, template: Optional[ChatTemplate],
                tokenizer: Tokenizer, data) -> DPOPair:
    prompt, chosen, rejected, string_form = pair_texts(record, where, template)
    core = list(tokenizer.hf.encode(prompt, add_special_tokens=False).ids)
    prompt_ids = ([tokenizer.bos] if data.add_bos and tokenizer.bos is not None else []) + core
    samples, differs = [], None
    for text, name in ((chosen, "chosen"), (rejected, "rejected")):
        ids = list(tokenizer.hf.encode(text, add_special_tokens=False).ids)
        at = _first_difference(tokenizer.hf.encode(prompt + text, add_special_tokens=False).ids,
                               core + ids)
        if at is not None and differs is None:
            differs = at + len(prompt_ids) - len(core)
        # the model's EOS (TRL appends tokenizer.eos_token), not the data's separator
        if string_form and data.append_eod and (not ids or ids[-1] != tokenizer.eos):
            ids.append(tokenizer.eos)
        if not ids:
            raise ChatDataError(f"{where}: the {name} response is empty")
        samples.append(SFTSample(np.asarray(prompt_ids + ids, dtype=np.int64),
                                 np.asarray([False] * len(prompt_ids) + [True] * len(ids)),
                                 where))
    rewards = []
    for key, default in (("chosen_reward", data.default_chosen_reward),
                         ("rejected_reward", data.default_rejected_reward)):
        value = record.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ChatDataError(f"{where}: {key} must be a number")
        rewards.append(float(value))
    pair = DPOPair(samples[0], samples[1], (rewards[0], rewards[1]), where, len(prompt_ids),
                   joint_differs=differs)
    pair.masked = max(samples[0].positions, samples[1].positions) > data.seq_length
    return pair


def _files(file_path) -> List[Path]:
    return [Path(p) for p in ([file_path] if isinstance(file_path, str) else list(file_path))]


def build_dpo_dataset(file_path, data, tokenizer: Tokenizer) -> DPODataset:
    """Every pair of `file_path` (a file or a list) tokenized; bad records raise ChatDataError
    naming file and line (or, with on_error=skip, are counted)."""
    template = ChatTemplate.for_tokenizer(tokenizer, data.chat_prompt_tokens)
    stats = {"records": 0, "masked_too_long": 0, "joint_tokenization_differs": 0,
             "skipped_bad_records": 0}
    errors: List[str] = []
    pairs = []
    for path in _files(file_path):
        for record, where in read_jsonl(path, data.on_error, errors):
            stats["records"] += 1
            try:
                pair = encode_pair(record, where, template, tokenizer, data)
            except ChatDataError as error:
                if data.on_error != "skip":
                    raise
                errors.append(str(error))
                continue
            stats["masked_too_long"] += pair.masked
            stats["joint_tokenization_differs"] += pair.joint_differs is not None
            pairs.append(pair)
    stats["skipped_bad_records"] = len(errors)
    stats["pairs"] = len(pairs)
    return DPODataset(pairs, stats, errors)


def _sequence_index(rows: List[List[SFTSample]], seq_length: int) -> Dict[str, torch.Tensor]:
    """seq_gather [n, L]: flat positions (into [b * s]) of each sequence's labels, in row
    order; seq_mask [n, L]: 1 where that label is trained (a response token)."""
    spans = []
    for r, row in enumerate(rows):
        start = 0
        for sample in row:
            spans.append((r * seq_length + start, sample))
            start += sample.positions
    longest = max((s.positions for _, s in spans), default=1)
    gather = torch.zeros((len(spans), longest), dtype=torch.long)
    mask = torch.zeros((len(spans), longest), dtype=torch.float)
    for k, (offset, sample) in enumerate(spans):
        n = sample.positions
        gather[k, :n] = torch.arange(offset, offset + n)
        mask[k, :n] = torch.from_numpy(sample.trained[1:]).float()
    return {"seq_gather": gather, "seq_mask": mask}


def collate_pairs(units: List[List[Tuple[int, DPOPair]]], seq_length: int, packed: bool,
                  pad_id: int) -> dict:
    """One micro-batch: `units` are packed rows (lists of pairs) or single pairs (two rows
    each); empty units pad."""
    if packed:
        rows = [[s for _, p in unit for s in (p.chosen, p.rejected)] for unit in units]
        row_length = 2 * seq_length
    else:
        rows = []
        for unit in units:  # one pair, or none (padding)
            rows += [[unit[0][1].chosen], [unit[0][1].rejected]] if unit else [[], []]
        row_length = seq_length
    batch = collate_rows(rows, row_length, pad_id, packed=packed)
    batch.update(_sequence_index(rows, row_length))
    pairs = [(i, p) for unit in units for i, p in unit]
    batch["pair_index"] = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    batch["rewards"] = torch.tensor([p.rewards for _, p in pairs],
                                    dtype=torch.float).reshape(-1, 2)
    return batch


@dataclass
class DPOStep:
    micro_batches: List[dict]
    pairs: int
    """Pairs of the global batch, masked ones included."""
    masked: int
    """Masked (too long) pairs of the global batch."""
    tokens: int
    """Positions of the global batch's valid sequences (all ranks)."""


def dpo_step_batches(dataset: DPODataset, indices, seq_length: int, packed: bool,
                     micro_batch_size: int, dp_rank: int, dp_size: int, pad_id: int) -> DPOStep:
    """Global batch `indices` -> units (pairs, or packed rows of pairs) -> this rank's
    micro-batches. Units are dealt over the data-parallel ranks, empty ones filling the last
    round, so every micro-batch has the same shape."""
    chosen = [(int(i), dataset.pairs[i]) for i in indices]
    valid = [(i, p) for i, p in chosen if not p.masked]
    if packed:
        units = [[valid[k] for k in row]
                 for row in pack_rows([p.positions for _, p in valid], 2 * seq_length, True)]
    else:
        units = [[v] for v in valid]
    units += [[] for _ in range(-len(units) % (micro_batch_size * dp_size))]
    mine = units[dp_rank::dp_size]
    micro = [collate_pairs(mine[k:k + micro_batch_size], seq_length, packed, pad_id)
             for k in range(0, len(mine), micro_batch_size)]
    return DPOStep(micro, len(chosen), len(chosen) - len(valid),
                   sum(p.positions for _, p in valid))
