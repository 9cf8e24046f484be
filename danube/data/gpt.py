"""Pretraining data: NeMo `data_prefix` blends -> megatron-core GPTDataset splits -> loaders.

Datasets come from megatron-core's BlendedMegatronDatasetBuilder (we do not re-implement
blending or sample indexing). The sampler hands each data-parallel rank its slice of every
global batch, starting at `consumed_samples`, so a resumed run continues with exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import fasteners
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from danube.config.derived import EMBEDDED_PREFIX, parse_blend
from danube.config.schema import DataConfig
from danube.data.embedded import embedded_prefix
from danube.data.tokenizer import Tokenizer

Blend = Tuple[List[str], Optional[List[float]]]


def resolve_blend(prefixes: Sequence, corpus_dir: Optional[Path]) -> Blend:
    """A NeMo blend list -> megatron's (paths, weights); `embedded:<src>` -> cached files."""
    paths, weights, problems = parse_blend(list(prefixes))
    if problems:
        raise ValueError(f"malformed data_prefix {list(prefixes)}: {'; '.join(problems)}")
    resolved = []
    for path in paths:
        if path.startswith(EMBEDDED_PREFIX):
            if corpus_dir is None:
                raise ValueError(f"{path} needs the embedded corpus, which was not built")
            path = embedded_prefix(corpus_dir, path[len(EMBEDDED_PREFIX):])
        resolved.append(path)
    return resolved, weights


def gpt_dataset_config(
    data: DataConfig, tokenizer: Tokenizer, seed: int, cache_dir: Path,
    corpus_dir: Optional[Path],
) -> GPTDatasetConfig:
    prefix = data.data_prefix
    blend, per_split = None, None
    if isinstance(prefix, dict):
        per_split = [
            resolve_blend(prefix[k], corpus_dir) if prefix.get(k) else None
            for k in ("train", "validation", "test")
        ]
    else:
        blend = resolve_blend(prefix, corpus_dir)
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=data.seq_length,
        blend=blend,
        blend_per_split=per_split,
        split=None if per_split else data.splits_string.replace("/", ","),
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=data.reset_position_ids,
        reset_attention_mask=data.reset_attention_mask,
        eod_mask_loss=data.eod_mask_loss,
        create_attention_mask=data.reset_attention_mask,
    )


INDEX_LOCK = ".danube-index.lock"


@contextlib.contextmanager
def index_cache_lock(cache_dir: str) -> Iterator[None]:
    """Held by each job's rank 0 while megatron-core builds: it writes the index .npy files
    one by one, not atomically, so two experiments sharing `model.data.index_mapping_dir`
    could each find some missing and write them at once (or read a half-written one). The
    other ranks wait in megatron's barrier inside the build and take no lock."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        yield
        return
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with fasteners.InterProcessLock(str(Path(cache_dir) / INDEX_LOCK)):
        yield


def build_gpt_datasets(config: GPTDatasetConfig, sizes: List[int]) -> List[Optional[GPTDataset]]:
    """[train, validation, test] datasets with at least `sizes` samples (None: empty split).
    Collective: every rank calls it (rank 0 writes the index cache first, under the lock)."""
    # A weighted blend needs a size for every split; an unused split gets a token one.
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [max(size, 1) for size in sizes], lambda: True, config
    )
    with index_cache_lock(config.path_to_cache):
        datasets = builder.build()
    return [ds if size > 0 else None for ds, size in zip(datasets, sizes)]


def data_plan(train) -> dict:
    """The pretraining order (danube.training.data_plan): the train split's blend of GPTDatasets,
    each source with its contents' size, its documents in the split, the samples drawn from it
    and the epochs its index shuffles over (megatron-core tiles and shuffles the documents
    once per epoch of the sample count)."""
    from megatron.core.datasets.blended_dataset import BlendedDataset

    parts = list(train.datasets) if isinstance(train, BlendedDataset) else [train]
    config = parts[0].config
    return {
        "samples": len(train),
        "weights": [float(w) for w in train.weights] if isinstance(train, BlendedDataset)
        else None,
        "seed": config.random_seed, "sequence_length": config.sequence_length,
        "split": [list(s) if s else None for s in config.split_matrix or []],
        "sources": [{
            "path": ds.dataset_path, "bytes": os.path.getsize(f"{ds.dataset_path}.bin"),
            "documents": len(ds.indices), "samples": int(ds.num_samples),
            "epochs": len(ds.document_index) // max(len(ds.indices), 1),
        } for ds in parts],
    }


class PretrainingSampler:
    """Megatron's pretraining order: sample i of the run is dataset index i. Each global
    batch is cut into micro-batches of `dp_size x micro_batch_size` consecutive samples, of
    which this rank takes its `micro_batch_size` slice."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        return remaining // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch_size * self.dp_size
        for start in range(self.consumed_samples, self.total_samples - step + 1, step):
            first = start + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))


def build_loader(dataset: GPTDataset, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, num_workers: int,
                 pin_memory: bool = False, seed: int = 0,
                 persistent_workers: bool = False) -> torch.utils.data.DataLoader:
    """`pin_memory` (on GPUs): batches in page-locked memory, so their copies to the device
    run asynchronously. The loader draws its workers' base seed from its own generator
    (seeded by `seed`): from torch's global one, every loader made after a resume would shift
    the run's CPU random stream by one draw (dropout would then differ from the straight
    run). Each iterator is read once, so workers need not persist; `close_loader` ends them."""
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                 dp_rank, dp_size)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def close_loader(iterator) -> None:
    """End a loader iterator's worker processes now (asked through their queues, joined, and
    terminated if they do not answer in torch's timeout): they block the stop signals, so
    only this (not SIGTERM) ends them cleanly."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
