"""Cheap integrity checks of Megatron indexed datasets (<prefix>.bin + <prefix>.idx).

Bottom of the house, beside paths.py and runtime.py: file formats only, importing nothing of
ours, so the launch preflight (config/) reads them without climbing into data/ or training/.

Reads the .idx header and its last sequence entry only (constant time, whatever the size), so
the launch preflight can name a truncated or foreign file before anything is built.
Format as written by megatron-core's `indexed_dataset._IndexWriter`: magic, version (u64 = 1),
dtype code (u8), sequence count (u64), document count (u64), then int32 sequence lengths,
int64 byte pointers into the .bin, int64 document indices.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from typing import List, Optional, Tuple

_MAGIC = b"MMIDIDX\x00\x00"
_ITEM_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron DType code -> bytes
_HEADER = len(_MAGIC) + 8 + 1 + 8 + 8


def _header_fields(head: bytes) -> Tuple[int, int, int, int]:
    """version, dtype code, sequence count, document count of an .idx header."""
    return struct.unpack("<QBQQ", head[len(_MAGIC):])


def indexed_dataset_problem(prefix: str) -> Optional[str]:
    """What is wrong with <prefix>.bin/.idx, or None when they look consistent."""
    idx, binary = prefix + ".idx", prefix + ".bin"
    try:
        with open(idx, "rb") as f:
            head = f.read(_HEADER)
            if len(head) < _HEADER or not head.startswith(_MAGIC):
                return f"{idx} is not a Megatron index file (bad header)"
            version, code, sequences, documents = _header_fields(head)
            if version != 1 or code not in _ITEM_SIZE:
                return f"{idx}: unsupported version {version} or dtype code {code}"
            if sequences == 0:
                return f"{idx} holds no sequences (empty dataset)"
            expected_idx = _HEADER + sequences * (4 + 8) + documents * 8
            if os.path.getsize(idx) < expected_idx:
                return f"{idx} is truncated ({os.path.getsize(idx)} of {expected_idx} bytes)"
            f.seek(_HEADER + (sequences - 1) * 4)
            last_length = struct.unpack("<i", f.read(4))[0]
            f.seek(_HEADER + sequences * 4 + (sequences - 1) * 8)
            last_pointer = struct.unpack("<q", f.read(8))[0]
    except OSError as error:
        return f"cannot read {idx}: {error.strerror}"
    expected_bin = last_pointer + last_length * _ITEM_SIZE[code]
    actual_bin = os.path.getsize(binary)
    if actual_bin != expected_bin:
        return (f"{binary} has {actual_bin} bytes but its index describes {expected_bin}: "
                "truncated or from another build; rebuild the dataset")
    return None


def sequence_count(prefix: str) -> int:
    """Sequences (documents, as danube and preprocess_data.py write them) in <prefix>.idx."""
    with open(prefix + ".idx", "rb") as f:
        return _header_fields(f.read(_HEADER))[2]


@functools.lru_cache(maxsize=8)
def _split_matrix(splits_string: str) -> tuple:
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    return tuple(convert_split_vector_to_split_matrix(parse_and_normalize_split(splits_string)))


def empty_splits(sequences: int, splits_string: str) -> List[str]:
    """The splits that `splits_string` gives a share but, rounded as megatron-core's dataset
    builder rounds, no sequence of a dataset this size (megatron-core loops forever building
    a GPTDataset split without tokens)."""
    return [name for name, bookends in zip(("train", "validation", "test"),
                                           _split_matrix(splits_string))
            if bookends is not None
            and int(round(bookends[1] * sequences)) == int(round(bookends[0] * sequences))]


def documents_for_splits(splits_string: str) -> int:
    """A dataset size from which on no split with a share is empty: 1 / the smallest share
    (a split of share s gets round(b n) - round(a n) >= 1 sequences once s n >= 1)."""
    shares = [b - a for a, b in filter(None, _split_matrix(splits_string))]
    return math.ceil(1 / min(shares) - 1e-9)
