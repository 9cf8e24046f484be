"""Documents -> tokens -> Megatron .bin/.idx, written through megatron-core's
IndexedDatasetBuilder.

Workers write each shard as raw tokens (<shard>.tokens) and per-document lengths
(<shard>.lengths.npy), under temporary names moved into place when complete; they never import
torch or megatron-core (4 s and ~300 MB each). The main process then builds one prefix per
source with `IndexedDatasetBuilder.add_document`, shard by shard in order, and moves the
.bin/.idx into place last. Tokens are uint16 when the vocabulary fits (megatron-core's
`DType.optimal_dtype` rule: vocab < 65500), int32 otherwise.
"""

from __future__ import annotations

import functools
import itertools
import os
from pathlib import Path
from typing import Iterable, Iterator, List

import numpy as np

from danube.data.tokenizer import Tokenizer, load_tokenizer
from danube.prepare import curate
from danube.prepare.sources import Reader
from danube.prepare.tasks import TokenizeTask


@functools.lru_cache(maxsize=2)
def cached_tokenizer(path: str) -> Tokenizer:
    return load_tokenizer(path)


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65500 else np.int32  # DType.optimal_dtype


def _batches(texts: Iterable[str], size: int) -> Iterator[List[str]]:
    it = iter(texts)
    while batch := list(itertools.islice(it, size)):
        yield batch


def tokenize_documents(texts: Iterable[str], tokenizer: Tokenizer, shard: Path,
                       append_eod: bool, batch_size: int, add_bos: bool = False) -> dict:
    """Write <shard>.tokens and <shard>.lengths.npy (atomically): one document per text,
    [BOS] + its tokens + [EOD] as configured."""
    dtype = token_dtype(tokenizer.vocab_size)
    tmp_tokens = shard.with_name(f".tmp-{shard.name}.tokens")
    lengths: List[int] = []
    eod = [tokenizer.eod] if append_eod else []
    bos = [tokenizer.bos] if add_bos else []
    with open(tmp_tokens, "wb") as out:
        for batch in _batches(texts, batch_size):
            # encode_batch_fast: no offsets; one tokenizer thread per worker process
            ids = [bos + e.ids + eod for e in tokenizer.hf.encode_batch_fast(
                batch, add_special_tokens=False)]
            lengths += map(len, ids)
            out.write(np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype).tobytes())
    tmp_lengths = shard.with_name(f".tmp-{shard.name}.lengths.npy")
    np.save(tmp_lengths, np.asarray(lengths, dtype=np.int64))
    os.replace(tmp_tokens, f"{shard}.tokens")
    os.replace(tmp_lengths, f"{shard}.lengths.npy")
    return {"documents_out": len(lengths), "tokens_out": int(sum(lengths))}


def build_prefix(shards: List[Path], prefix: Path, vocab_size: int) -> None:
    """The shards' documents, in order, into <prefix>.bin/.idx through megatron-core's
    IndexedDatasetBuilder; written under temporary names and moved into place last."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = token_dtype(vocab_size)
    tmp = prefix.with_name(f".tmp-{prefix.name}")
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    for shard in shards:
        lengths = np.load(f"{shard}.lengths.npy")
        tokens = np.fromfile(f"{shard}.tokens", dtype=dtype)
        ends = np.cumsum(lengths)
        for start, end in zip((ends - lengths).tolist(), ends.tolist()):
            builder.add_document(tokens[start:end], [end - start])
    builder.finalize(f"{tmp}.idx")
    os.replace(f"{tmp}.bin", f"{prefix}.bin")
    os.replace(f"{tmp}.idx", f"{prefix}.idx")


def tokenize_shard(task: TokenizeTask) -> dict:
    """Worker task: the shard's (curated, deduplicated) documents -> <shard>.tokens and
    <shard>.lengths.npy (tokenize_documents)."""
    work, shard = Path(task.work), task.shard
    tokenizer = cached_tokenizer(task.tokenizer)
    stats: dict = {}
    if task.curated:
        texts = curate.deduplicated_texts(work, shard, task.exact, task.minhash, stats)
    else:
        reader = Reader(task.text_field, task.on_error)
        texts = (text for text, _ in reader.shard(task.pieces))
    result = tokenize_documents(texts, tokenizer, Path(task.prefix), task.append_eod,
                                task.batch_size, task.add_bos)
    if not task.curated:
        stats = {"documents_in": result["documents_out"], "read_errors": dict(reader.errors),
                 "documents_empty": reader.empty_documents}
    return {**result, "duplicates": stats} if task.curated else {**result, **stats}
