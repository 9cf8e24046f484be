"""The tasks that cross into worker processes: typed, frozen and picklable (spawned workers
receive them by pickle), one per stage. A stage's worker function takes its task type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from danube.prepare.config import FiltersConfig, MinhashConfig


@dataclass(frozen=True)
class FilterTask:
    """Curation stage 1, one shard: read, filter, write curated/removed documents (and exact
    dedup signatures)."""

    work: str
    shard: int
    num_shards: int
    pieces: List[dict]
    text_field: str
    on_error: str
    filters: List[str]
    filters_cfg: FiltersConfig
    exact: bool


@dataclass(frozen=True)
class SignatureTask:
    """MinHash signatures of one shard's curated (exact-deduplicated) documents."""

    work: str
    shard: int
    num_shards: int
    exact: bool
    minhash: MinhashConfig
    language: str


@dataclass(frozen=True)
class BucketTask:
    """One MinHash LSH band."""

    work: str
    bucket: int
    minhash: MinhashConfig


@dataclass(frozen=True)
class TokenizeTask:
    """One shard's (curated, deduplicated) documents -> <prefix>.tokens / .lengths.npy."""

    work: str
    shard: int
    pieces: List[dict]
    curated: bool
    exact: bool
    minhash: bool
    text_field: str
    on_error: str
    tokenizer: str
    prefix: str
    append_eod: bool
    add_bos: bool
    batch_size: int
