"""Documents -> tokens -> Megatron .bin/.idx (megatron-core's indexed dataset format).

Workers write each shard as raw tokens (<shard>.tokens) and per-document lengths
(<shard>.lengths.npy), under temporary names moved into place when complete; they never import
torch or megatron-core (4 s and ~300 MB each). The main process then builds one prefix per
source: the shards' token files concatenated into the .bin, the .idx written from their
lengths arrays with numpy (what `IndexedDatasetBuilder` writes, without its Python call per
document), and moves the .bin/.idx into place last. Tokens are uint16 when the vocabulary
fits (megatron-core's `DType.optimal_dtype` rule: vocab < 65500), int32 otherwise.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import struct
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


# megatron-core's indexed dataset format (megatron/core/datasets/indexed_dataset.py), here so
# that data preparation does not import megatron-core (5 s) for two constants; the test
# compares whole files with its IndexedDatasetBuilder's.
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
                np.float64: 6, np.float32: 7, np.uint16: 8}


def write_index(path: str, lengths: np.ndarray, dtype) -> None:
    """megatron-core's .idx for one sequence per document, written from the lengths array in
    a few numpy writes (byte for byte what `IndexedDatasetBuilder.finalize` writes; its
    `add_document` loop costs a Python call per document): header, version 1, dtype code,
    sequence and document counts, int32 lengths, int64 byte offsets, int64 document
    boundaries [0, 1, ..., n]."""
    count = len(lengths)
    pointers = np.zeros(count, dtype=np.int64)
    np.cumsum(lengths[:-1] * np.dtype(dtype).itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(_INDEX_HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", _DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", count))
        f.write(struct.pack("<Q", count + 1))
        f.write(lengths.astype(np.int32).tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(count + 1, dtype=np.int64).tobytes())


def _append(src: str, out) -> None:
    """Append file `src` to the open file `out`, in the kernel where it can
    (copy_file_range: 3x a user-space copy here; a reflink on XFS/Btrfs)."""
    with open(src, "rb") as f:
        size, done = os.fstat(f.fileno()).st_size, 0
        try:
            while done < size:
                copied = os.copy_file_range(f.fileno(), out.fileno(), size - done)
                if copied == 0:
                    break
                done += copied
        except OSError:  # across filesystems on older kernels, or not supported
            pass
        if done < size:
            f.seek(done)
            shutil.copyfileobj(f, out, 16 << 20)


def build_prefix(shards: List[Path], prefix: Path, vocab_size: int) -> None:
    """The shards' documents, in order, into <prefix>.bin/.idx: the .bin is the shards' token
    files one after another, the .idx comes from their lengths arrays (`write_index`);
    written under temporary names and moved into place last."""
    dtype = token_dtype(vocab_size)
    lengths = [np.load(f"{shard}.lengths.npy") for shard in shards]
    for shard, shard_lengths in zip(shards, lengths):
        size, expected = os.path.getsize(f"{shard}.tokens"), \
            int(shard_lengths.sum()) * np.dtype(dtype).itemsize
        if size != expected:
            raise ValueError(f"{shard}.tokens has {size} bytes but its lengths describe "
                             f"{expected}: the shard is damaged; delete it and run again")
    tmp = prefix.with_name(f".tmp-{prefix.name}")
    with open(f"{tmp}.bin", "wb", buffering=0) as out:
        for shard in shards:
            _append(f"{shard}.tokens", out)
    write_index(f"{tmp}.idx", np.concatenate(lengths) if lengths else np.zeros(0, np.int64),
                dtype)
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
