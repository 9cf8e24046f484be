"""Guard the container's own CUDA stack while pip installs ours.

    python docker/image_stack.py record /tmp/image-stack.json   # before `pip install`
    python docker/image_stack.py verify /tmp/image-stack.json   # after: exit 1 if replaced

The NGC PyTorch image ships its own torch and Transformer Engine builds (matched to its CUDA,
cuDNN and NCCL). A dependency that asks pip for another torch silently replaces it, and TE then
fails with undefined symbols at import (../shared/notes/gpu-slurm-ngc.md, "Pitfalls"). The
build records the versions and install locations first and fails if any changed.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

GUARDED = ("torch", "transformer_engine", "transformer_engine_torch", "apex")


def stack() -> dict:
    """distribution -> [version, install location] for the guarded packages present."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("-", "_")
        if name in GUARDED:
            found[name] = [dist.version, str(dist.locate_file(""))]
    return found


def main(argv) -> int:
    if len(argv) != 3 or argv[1] not in ("record", "verify"):
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(argv[2])
    if argv[1] == "record":
        path.write_text(json.dumps(stack(), indent=2))
        print(f"image stack: {stack()}")
        return 0
    before, after = json.loads(path.read_text()), stack()
    changed = {name: (was, after.get(name)) for name, was in before.items()
               if after.get(name) != was}
    if changed:
        for name, (was, now) in changed.items():
            print(f"error: pip replaced the image's {name}: {was} -> {now}", file=sys.stderr)
        print("a dependency asked for another build; keep the image's (pin it, or install "
              "with --no-deps) and rebuild", file=sys.stderr)
        return 1
    print(f"image stack kept: {after}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
