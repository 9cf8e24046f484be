"""`inspect`: print N documents from any stage of a prepared dataset, because reading samples
is how data bugs are found.

Stages: raw (the inputs as read), curated (after the filters), removed (what a filter or a
dedup step dropped, with the reason; `step` picks one), kept (decoded from the final .bin/.idx).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from omegaconf import OmegaConf

from danube.prepare.config import PrepareConfig, prefix_of

STAGES = ("raw", "curated", "removed", "kept")


def _reservoir(items: Iterator[Tuple[str, str]], n: int, seed: int) -> List[Tuple[str, str]]:
    """n items drawn uniformly from a stream of unknown length, in stream order."""
    rng = random.Random(seed)
    chosen: List[Tuple[int, Tuple[str, str]]] = []
    for i, item in enumerate(items):
        if len(chosen) < n:
            chosen.append((i, item))
        elif (j := rng.randrange(i + 1)) < n:
            chosen[j] = (i, item)
    return [item for _, item in sorted(chosen, key=lambda c: c[0])]


def _jsonl_stage(files: List[Path]) -> Iterator[Tuple[str, str]]:
    from danube.prepare.curate import read_jsonl

    for path in files:
        for record in read_jsonl(path):
            reason = record.get("reason")
            yield record["text"], record["id"] + (f"  [removed: {reason}]" if reason else "")


def stage_documents(out: Path, source: str, stage: str,
                    step: Optional[str] = None) -> Iterator[Tuple[str, str]]:
    """(text, label) of one source at one stage."""
    manifest = json.loads((out / "manifest.json").read_text())
    if source not in manifest["sources"]:
        raise ValueError(f"{out} has no prepared source {source!r}; it has "
                         f"{', '.join(manifest['sources'])}")
    work = Path(manifest["sources"][source]["work"])
    if stage == "raw":
        from danube.prepare.sources import Reader, list_files, plan_shards

        loaded = OmegaConf.merge(OmegaConf.structured(PrepareConfig),
                                 OmegaConf.load(out / "prepare_config.yaml"))
        cfg: PrepareConfig = OmegaConf.to_object(loaded)
        src = next(s for s in cfg.sources if s.name == source)
        reader = Reader(src.text_field, "skip")
        for pieces in plan_shards(list_files(src)[0], cfg.tokenization.shard_size_mb):
            yield from reader.shard(pieces)
    elif stage in ("curated", "removed"):
        pattern = "curated/*.jsonl.gz" if stage == "curated" else \
            f"removed/{step or '*'}/*.jsonl.gz"
        files = sorted(work.glob(pattern))
        if not files and stage == "removed" and step:
            known = sorted(p.name for p in (work / "removed").glob("*"))
            raise ValueError(f"no documents removed by {step!r} in {source}; steps with "
                             f"removals: {', '.join(known) or 'none'}")
        yield from _jsonl_stage(files)
    elif stage == "kept":
        yield from _kept(out, source)
    else:
        raise ValueError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")


def _kept(out: Path, source: str) -> Iterator[Tuple[str, str]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from danube.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(out / "tokenizer")
    dataset = IndexedDataset(str(prefix_of(out, source)))
    for i in range(len(dataset)):
        yield tokenizer.detokenize(dataset[i]), f"document {i} ({len(dataset[i])} tokens)"


def inspect(out: Path, source: str, stage: str, n: int = 3, step: Optional[str] = None,
            seed: int = 0, chars: int = 600) -> str:
    samples = _reservoir(stage_documents(out, source, stage, step), n, seed)
    parts = [f"{source} / {stage}{f' / {step}' if step else ''}: {len(samples)} sample(s)"]
    for text, label in samples:
        shown = text if len(text) <= chars else text[:chars] + f" ... [{len(text):,} chars]"
        parts.append(f"--- {label}\n{shown}")
    return "\n".join(parts)
