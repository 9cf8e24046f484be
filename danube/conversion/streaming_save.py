"""Write a megatron-core `torch_dist` checkpoint without holding the model in memory.

megatron-core's own writer takes every tensor of the state dict at once. Here the state dict
comes from a GPTModel built on the meta device (shapes only), and a save strategy (megatron's
extension point for sharded saves, same `torch_dist` backend and version, so the usual loaders
read the result) hands PyTorch DCP's synchronous FileSystemWriter a planner that produces each
tensor chunk only when the writer asks for it: one chunk in memory at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Tuple

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.planner import WriteItemType

# (checkpoint key, offsets of the chunk in the global tensor) -> the chunk's data
Resolve = Callable[[str, Tuple[int, ...]], torch.Tensor]


class _OnDemandPlanner(MCoreSavePlanner):
    def __init__(self, resolve: Resolve):
        super().__init__(flatten_state_dict=False)
        self.resolve = resolve

    def resolve_data(self, write_item):
        if write_item.type != WriteItemType.SHARD:
            return super().resolve_data(write_item)  # ShardedObjects (extra state): bytes
        chunk, props = write_item.tensor_data.chunk, write_item.tensor_data.properties
        data = self.resolve(write_item.index.fqn, tuple(write_item.index.offset))
        if data.numel() != chunk.sizes.numel():
            raise ValueError(f"{write_item.index.fqn} at {tuple(write_item.index.offset)}: got "
                             f"{tuple(data.shape)}, the checkpoint needs {tuple(chunk.sizes)}")
        return data.reshape(chunk.sizes).to(props.dtype).contiguous()


class OnDemandTorchDistSave(SaveShardedStrategy):
    """`dist_checkpointing.save(..., sharded_strategy=OnDemandTorchDistSave(resolve))`."""

    def __init__(self, resolve: Resolve):
        super().__init__("torch_dist", 1)
        self.resolve = resolve

    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
        state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        dcp.save(mcore_to_pyt_state_dict(state, False),
                 storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1),
                 planner=_OnDemandPlanner(self.resolve))
