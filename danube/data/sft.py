"""SFT data: JSONL conversations -> encoded samples -> global batches (packed or not) ->
this rank's micro-batches.

A global batch is `global_batch_size` conversations whether packed or not, in an order fixed
by the seed and the epoch, so a packed and an unpacked run see the same conversations at
every step and a resumed run continues with the batches an uninterrupted one would have seen.
Packing happens within the global batch: first-fit decreasing into rows of `max_seq_length`
positions; each conversation attends only to itself (a block-diagonal causal mask, with the
sliding window inside each block applied by the attention), its positions restart at 0, and no
label crosses a boundary (each conversation is shifted on its own). The rows are split evenly
over the data-parallel ranks (empty rows pad the count) and cut into micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from danube.data.chat import (
    ChatDataError,
    ChatTemplate,
    Encoded,
    encode_chat,
    encode_prompt_response,
    finish,
    messages_of,
    read_jsonl,
)
from danube.data.tokenizer import Tokenizer


@dataclass
class SFTSample:
    ids: np.ndarray
    """[n] token ids (BOS first when configured)."""
    trained: np.ndarray
    """[n] bool: id belongs to an answer; label position t is trained when trained[t + 1]."""
    where: str
    truncated: bool = False

    @property
    def positions(self) -> int:
        """Input positions it takes in a row: n - 1 (each input predicts the next id)."""
        return len(self.ids) - 1


@dataclass
class SFTDataset:
    samples: List[SFTSample]
    stats: Dict[str, int] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)


def _files(file_path) -> List[Path]:
    return [Path(p) for p in ([file_path] if isinstance(file_path, str) else list(file_path))]


def build_sft_dataset(ds, data, tokenizer: Tokenizer, answer_only: bool,
                      on_error: str = "raise") -> SFTDataset:
    """Every conversation of `ds.file_path` encoded; drops (and counts) those that are too
    short or have no trained token left after truncation. Bad records raise ChatDataError
    naming file and line, or with on_error=skip are counted."""
    template = ChatTemplate.for_tokenizer(tokenizer, data.chat_prompt_tokens) if data.chat \
        else None
    stats = {"records": 0, "truncated": 0, "dropped_no_answer_left": 0, "dropped_too_short": 0,
             "skipped_bad_records": 0, "answers_ending_trained": 0}
    errors: List[str] = []
    samples = []
    for path in _files(ds.file_path):
        for record, where in read_jsonl(path, on_error, errors):
            stats["records"] += 1
            try:
                if data.chat:
                    encoded = encode_chat(messages_of(record, where), template, tokenizer,
                                          answer_only, where)
                else:
                    extra = int(ds.add_eos is not False) + int(bool(ds.add_bos))
                    encoded = encode_prompt_response(
                        record, ds.prompt_template, ds.label_key, tokenizer, answer_only,
                        where, ds.max_seq_length + 1 - extra, ds.truncation_field,
                        ds.truncation_method)
            except ChatDataError as error:
                if on_error != "skip":
                    raise
                errors.append(str(error))
                continue
            sample = _finish(encoded, ds, tokenizer, data.chat, where)
            if len(sample.ids) < max(ds.min_seq_length, 2):
                stats["dropped_too_short"] += 1
                continue
            if not sample.trained[1:].any():
                stats["dropped_no_answer_left"] += 1
                continue
            stats["truncated"] += sample.truncated
            stats["answers_ending_trained"] += bool(sample.trained[-1])
            samples.append(sample)
    stats["skipped_bad_records"] = len(errors)
    stats["conversations"] = len(samples)
    return SFTDataset(samples, stats, errors)


def _finish(encoded: Encoded, ds, tokenizer: Tokenizer, chat: bool, where: str) -> SFTSample:
    """Chat: nothing is added at the end (the template decides the end-of-turn tokens);
    prompt-response: add_eos (null = true) ends the answer with the model's EOS."""
    add_eos = False if chat else ds.add_eos is not False
    done = finish(encoded, tokenizer, ds.add_bos, add_eos, ds.max_seq_length + 1,
                  ds.truncation_method)
    return SFTSample(np.asarray(done.ids, dtype=np.int64), np.asarray(done.trained, dtype=bool),
                     where, done.truncated)


def epoch_order(num_samples: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_samples)
    return np.random.RandomState((seed + 7919 * epoch) % 2**32).permutation(num_samples)


def global_batch_indices(num_samples: int, global_batch_size: int, step: int, seed: int,
                         shuffle: bool) -> np.ndarray:
    """Conversations of global batch `step` (from 0): whole batches per epoch (drop_last)."""
    per_epoch = num_samples // global_batch_size
    epoch, within = divmod(step, per_epoch)
    order = epoch_order(num_samples, epoch, seed, shuffle)
    return order[within * global_batch_size:(within + 1) * global_batch_size]


def pack_rows(lengths: List[int], capacity: int, packed: bool) -> List[List[int]]:
    """Rows of positions indices into `lengths`: one each, or first-fit decreasing (ties by
    index, so every rank computes the same rows)."""
    if not packed:
        return [[i] for i in range(len(lengths))]
    rows: List[List[int]] = []
    free: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if slot is None:
            rows.append([i])
            free.append(capacity - lengths[i])
        else:
            rows[slot].append(i)
            free[slot] -= lengths[i]
    return rows


def collate_rows(rows: List[List[SFTSample]], seq_length: int, pad_id: int,
                 packed: bool) -> dict:
    """Micro-batch tensors: tokens, labels, loss_mask, position_ids [b, s]; `packed` adds
    `cu_seqlens` [n+1] (int32), the start of every packed conversation and of every row's
    padding tail in the flattened [b * s] micro-batch, and its total: megatron/TE's THD
    layout, in which `training.step` runs the rows as one sequence of documents that each
    attend only to themselves (TE's fused THD attention, FlexAttention's document mask, or
    SDPA's block-diagonal mask on a CPU)."""
    b = len(rows)
    tokens = torch.full((b, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, seq_length), dtype=torch.float)
    positions = torch.zeros((b, seq_length), dtype=torch.long)
    starts = []  # offsets into the flattened micro-batch where a document begins
    for r, row in enumerate(rows):
        start = 0
        for sample in row:
            n = sample.positions
            ids = torch.from_numpy(sample.ids)
            tokens[r, start:start + n] = ids[:-1]
            labels[r, start:start + n] = ids[1:]
            loss_mask[r, start:start + n] = torch.from_numpy(sample.trained[1:]).float()
            positions[r, start:start + n] = torch.arange(n)
            starts.append(r * seq_length + start)
            start += n
        if start < seq_length:  # the padding tail: a document of its own, nothing trained
            starts.append(r * seq_length + start)
    batch = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
             "position_ids": positions}
    if packed:
        batch["cu_seqlens"] = torch.tensor(starts + [b * seq_length], dtype=torch.int32)
    return batch


@dataclass
class StepBatches:
    """One global batch as this rank sees it."""

    micro_batches: List[dict]
    samples: int
    """Conversations in the global batch (all ranks)."""
    trained_tokens: int
    """Trained (unmasked) label tokens in the global batch (all ranks)."""


def step_batches(dataset: SFTDataset, indices: np.ndarray, seq_length: int, packed: bool,
                 micro_batch_size: int, dp_rank: int, dp_size: int, pad_id: int) -> StepBatches:
    """The global batch `indices` -> rows (packed or not) -> this rank's micro-batches."""
    samples = [dataset.samples[i] for i in indices]
    rows = [[samples[i] for i in row]
            for row in pack_rows([s.positions for s in samples], seq_length, packed)]
    per_round = micro_batch_size * dp_size
    rows += [[] for _ in range(-len(rows) % per_round)]  # empty rows: nothing trained
    mine = rows[dp_rank::dp_size]
    micro = [collate_rows(mine[i:i + micro_batch_size], seq_length, pad_id, packed)
             for i in range(0, len(mine), micro_batch_size)]
    trained = sum(int(s.trained[1:].sum()) for s in samples)
    return StepBatches(micro, len(samples), trained)


def steps_per_epoch(dataset: SFTDataset, global_batch_size: int) -> int:
    return len(dataset.samples) // global_batch_size


def describe_sample(rows: List[SFTSample], tokenizer: Tokenizer, seq_length: int,
                    packed: bool) -> List[str]:
    """Dry-run lines for one row: per position, trained or not, the position, the input token
    and the label it predicts, grouped by conversation (pack boundaries)."""
    batch = collate_rows([rows], seq_length, 0, False)
    lines = []
    start = 0
    for k, sample in enumerate(rows):
        note = ", truncated" if sample.truncated else ""
        lines.append(f"  -- conversation {k} ({sample.where}{note})"
                     + (" [packed]" if packed else ""))
        for t in range(sample.positions):
            seen, label = int(batch["tokens"][0, start + t]), int(batch["labels"][0, start + t])
            mark = "TRAIN" if batch["loss_mask"][0, start + t] > 0 else "  -  "
            lines.append(f"  {mark} pos {t:4d}  {tokenizer.hf.id_to_token(seen)!r:>16} -> "
                         f"{label:6d} {tokenizer.hf.id_to_token(label)!r}")
        start += sample.positions
    return lines

