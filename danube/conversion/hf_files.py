"""Reading Hugging Face weights lazily and writing sharded safetensors as they come.

Reading: safetensors (single file or index) through `safe_open`, one tensor at a time;
PyTorch `.bin` files through `torch.load(weights_only=True, mmap=True)` (no pickle code runs,
no copy in memory). Writing: safetensors only, shards of at most `max_shard_bytes`, written as
soon as full, then named `model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE = ("model.safetensors", "pytorch_model.bin")
IGNORED = ("rotary_emb.inv_freq",)  # buffers some old Llama .bin files carry


class HFWeights:
    """Name -> tensor of a Hugging Face checkpoint directory, loaded on demand."""

    def __init__(self, hf_dir: Path):
        hf_dir = Path(hf_dir)
        self.files: Dict[str, Path] = {}
        for index in _INDEXES:
            if (hf_dir / index).is_file():
                weight_map = json.loads((hf_dir / index).read_text())["weight_map"]
                self.files = {name: hf_dir / file for name, file in weight_map.items()}
                break
        else:
            for single in _SINGLE:
                if (hf_dir / single).is_file():
                    self.files = {name: hf_dir / single for name in _names(hf_dir / single)}
                    break
        if not self.files:
            raise FileNotFoundError(f"{hf_dir} holds no model.safetensors(.index.json) or "
                                    "pytorch_model.bin(.index.json)")

    def names(self) -> List[str]:
        return [n for n in self.files if not n.endswith(IGNORED)]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out; the file's mapping is dropped again, so the pages read
        do not pile up in this process (opening a file only reads its header)."""
        path = self.files[name]
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return f.get_tensor(name)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)[name].clone()


def _names(path: Path) -> List[str]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    return list(torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys())


class ShardedSafetensorsWriter:
    """Buffers tensors up to `max_shard_bytes`, writes each full shard at once."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.buffer: Dict[str, torch.Tensor] = {}
        self.buffered_bytes = 0
        self.shards: List[List[str]] = []
        self.total_bytes = 0
        self.peak_buffered_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered_bytes + size > self.max_shard_bytes:
            self._flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered_bytes += size
        self.total_bytes += size
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, self.buffered_bytes)

    def _flush(self) -> None:
        save_file(self.buffer, str(self._part(len(self.shards))), metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.buffered_bytes = {}, 0

    def _part(self, index: int) -> Path:
        return self.out_dir / f".part-{index:05d}.safetensors"

    def finish(self) -> None:
        """Flush the last shard, give every shard its final name, write the index."""
        if self.buffer:
            self._flush()
        count, weight_map = len(self.shards), {}
        for index, names in enumerate(self.shards):
            final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            self._part(index).rename(self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
