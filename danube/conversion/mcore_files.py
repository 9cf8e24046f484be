"""Reading tensors out of a danube checkpoint by slices, one layer at a time.

megatron-core's `torch_dist` format is a PyTorch Distributed Checkpoint (DCP): every per-layer
weight is one global tensor with a leading layer axis ([num_layers, ...]) whatever the TP/PP
layout it was saved with, stored as chunks (one per layer and TP shard). DCP's own resharding
planner (`create_read_items_for_chunk_list`) maps the slice we ask for onto those chunks and
its FileSystemReader reads just them: any layout in, one layer in memory at a time, and no
process group needed. (megatron's `dist_checkpointing.load` can only load whole tensors when
there is a single process.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from danube.conversion.layout import LAYER_KEYS, LAYER_PREFIX
from danube.model_names import LORA_ADAPTERS


class _IntoBuffers:
    """The two LoadPlanner calls FileSystemReader.read_data makes: where each read lands."""

    def __init__(self, buffers: Dict[str, Tuple[torch.Tensor, Tuple[int, ...]]]):
        self.buffers = buffers  # fqn -> (destination, its offsets in the global tensor)

    def resolve_tensor(self, item) -> torch.Tensor:
        dest, _ = self.buffers[item.dest_index.fqn]
        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, item, tensor) -> None:
        pass  # resolve_tensor handed out a view: the data is already in place


class DistCheckpointReader:
    def __init__(self, path: Path):
        self.reader = FileSystemReader(str(path))
        self.metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        self.tensors = self.metadata.state_dict_metadata
        self.num_layers = self.tensors[f"{LAYER_PREFIX}.{LAYER_KEYS[2]}"].size[0]

    def _read(self, requests: Dict[str, Tuple[int, ...]]) -> Dict[str, torch.Tensor]:
        """fqn -> offsets of the slice wanted (a whole tensor, or one index of its first axis)."""
        buffers, items = {}, []
        for fqn, offsets in requests.items():
            info = self.tensors[fqn]
            sizes = tuple(info.size) if not offsets else (1, *info.size[1:])
            offsets = offsets or (0,) * len(sizes)
            buffers[fqn] = (torch.empty(sizes, dtype=info.properties.dtype), offsets)
            items += create_read_items_for_chunk_list(
                fqn, info, [ChunkStorageMetadata(offsets=torch.Size(offsets),
                                                 sizes=torch.Size(sizes))])
        self.reader.read_data(LoadPlan(items), _IntoBuffers(buffers)).wait()
        return {fqn: buffer for fqn, (buffer, _) in buffers.items()}

    def tensor(self, key: str) -> torch.Tensor:
        return self._read({key: ()})[key]

    def adapter_keys(self) -> list:
        """Layer keys (relative to decoder.layers.N) of LoRA adapters in this checkpoint."""
        prefix = f"{LAYER_PREFIX}."
        return sorted(key[len(prefix):] for key in self.tensors
                      if key.startswith(prefix) and key.rsplit(".", 1)[-1] in LORA_ADAPTERS)

    def layer(self, index: int, keys=LAYER_KEYS) -> Dict[str, torch.Tensor]:
        """Layer `index`'s tensors, keyed relative to decoder.layers.N (see layout.py)."""
        full = {f"{LAYER_PREFIX}.{k}": (index,) + (0,) * (len(self.tensors[
            f"{LAYER_PREFIX}.{k}"].size) - 1) for k in keys}
        loaded = self._read(full)
        return {k: loaded[f"{LAYER_PREFIX}.{k}"][0] for k in keys}
