"""Curation with datatrove: heuristic filters, exact and MinHash near-duplicate removal.

datatrove does the work (its Gopher / C4 / language filters, and its exact and MinHash
dedup stages, each run with rank = shard index and world size = shard count); this module
only wires them to our shards, writes what each step removed (for `inspect`) and counts.

Per source, in order (each stage resumable per shard through its `.done.json`):
  1. filter (per shard): raw -> filters -> curated/<shard>.jsonl.gz (+ exact signatures)
  2. exact find (once);  3. MinHash signatures (per shard, on exact-deduplicated documents)
  4. MinHash buckets (per bucket);  5. MinHash clusters (once)
and the tokenize stage reads curated shards through `dedup_filters` (exact, then MinHash).
"""

from __future__ import annotations

import gzip
import os
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import orjson

from danube.prepare.config import FiltersConfig, MinhashConfig
from danube.prepare.sources import Reader
from danube.prepare.tasks import BucketTask, FilterTask, SignatureTask


def document_text(doc) -> str:  # datatrove reads the return annotation
    return doc.text


class JsonlOut:
    """Gzipped JSONL written under a temporary name and moved into place by `commit`; also
    the exclusion writer datatrove's dedup filters call (`with writer: writer.write(doc)`)."""

    def __init__(self, path: Path, reason: Optional[str] = None):
        self.path = path
        self.reason = reason  # recorded with every document when write() names none
        self.tmp = path.with_name(f".tmp-{path.name}")
        self.count = 0
        self._file = None

    def write(self, doc, rank: int = 0, reason: Optional[str] = None) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = gzip.open(self.tmp, "wb", compresslevel=1)
        record = {"text": doc.text, "id": doc.id}
        if reason or self.reason:
            record["reason"] = reason or self.reason
        self._file.write(orjson.dumps(record) + b"\n")
        self.count += 1

    def commit(self) -> None:
        if self._file is not None:
            self._file.close()
            os.replace(self.tmp, self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _curated_path(work: Path, shard: int) -> Path:
    return work / "curated" / f"{shard:05d}.jsonl.gz"


def _removed_out(work: Path, step: str, shard: int) -> JsonlOut:
    """Where `step` (a filter or a dedup step) writes the documents it removed from a shard."""
    return JsonlOut(work / "removed" / step / f"{shard:05d}.jsonl.gz", reason=step)


def _dir(work: Path, *parts: str) -> str:
    """A datatrove data folder (it takes str paths), created so that readers find it."""
    path = work.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def read_jsonl(path: Path) -> Iterator[dict]:
    with gzip.open(path, "rb") as f:
        for line in f:
            yield orjson.loads(line)


def build_filters(names: List[str], cfg: FiltersConfig) -> List[Tuple[str, object]]:
    """datatrove filter objects, in the source's order."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
    )

    built = []
    for name in names:
        if name == "gopher_quality":
            built.append((name, GopherQualityFilter(**vars(cfg.gopher_quality),
                                                    language=cfg.language)))
        elif name == "gopher_repetition":
            built.append((name, GopherRepetitionFilter(**vars(cfg.gopher_repetition),
                                                       language=cfg.language)))
        elif name == "c4_quality":
            built.append((name, C4QualityFilter(**vars(cfg.c4_quality), language=cfg.language)))
        elif name == "language_id":
            lid = cfg.language_id
            step = LanguageFilter(languages=list(lid.languages), language_threshold=lid.min_score)
            step.model = _file_lid(lid.model_path, list(lid.languages))
            built.append((name, step))
    return built


def _file_lid(model_path: str, languages: List[str]):
    """datatrove's fastText language ID reading the user's model file (its own would
    download lid.176.bin, which these machines cannot)."""
    from datatrove.utils.lid import FastTextLID

    class FileLID(FastTextLID):
        @property
        def model(self):
            if self._model is None:
                from fasttext.FastText import _FastText

                self._model = _FastText(model_path)
            return self._model

    return FileLID(languages)


def filter_shard(task: FilterTask) -> dict:
    """Stage 1 for one shard (a worker task: typed task in, stats dict out)."""
    from datatrove.data import Document
    from datatrove.pipeline.filters.base_filter import get_filter_result

    work, shard = Path(task.work), task.shard
    reader = Reader(task.text_field, task.on_error)
    filters = build_filters(task.filters, task.filters_cfg)
    curated = JsonlOut(_curated_path(work, shard))
    removed = {name: _removed_out(work, name, shard) for name, _ in filters}
    reasons: Counter = Counter()
    stats = {"documents_in": 0, "bytes_in": 0}

    def kept() -> Iterator:
        for text, ref in reader.shard(task.pieces):
            stats["documents_in"] += 1
            stats["bytes_in"] += len(text)
            doc = Document(text=text, id=ref)
            for name, step in filters:
                keep, reason = get_filter_result(step.filter(doc))
                if not keep:
                    reasons[reason or name] += 1
                    removed[name].write(doc, reason=reason or name)
                    break
            else:
                curated.write(doc)
                yield doc

    if task.exact:
        from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupSignature

        ExactDedupSignature(_dir(work, "exact", "sigs"), ExactDedupConfig(document_text)).run(
            kept(), rank=shard, world_size=task.num_shards)
    else:
        for _ in kept():
            pass
    for out in [curated, *removed.values()]:
        out.commit()
    return {**stats, "read_errors": dict(reader.errors), "documents_empty": reader.empty_documents,
            "removed": {name: out.count for name, out in removed.items()},
            "removed_reasons": dict(reasons), "documents_curated": curated.count}


def curated_documents(work: Path, shard: int) -> Iterator:
    from datatrove.data import Document

    path = _curated_path(work, shard)
    if path.is_file():
        for record in read_jsonl(path):
            yield Document(text=record["text"], id=record["id"])


def _minhash(cfg: MinhashConfig):
    from datatrove.pipeline.dedup.minhash import MinhashConfig as DatatroveMinhash

    return DatatroveMinhash(n_grams=cfg.n_grams, num_buckets=cfg.num_buckets,
                            hashes_per_bucket=cfg.hashes_per_bucket, seed=cfg.seed)


def exact_find(work: Path) -> None:
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactFindDedups

    ExactFindDedups(_dir(work, "exact", "sigs"), _dir(work, "exact", "dups"),
                    ExactDedupConfig(document_text)).run(None, rank=0, world_size=1)


def _exact_filtered(work: Path, shard: int, docs: Iterator, writer=None) -> Iterator:
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupFilter

    step = ExactDedupFilter(_dir(work, "exact", "dups"), ExactDedupConfig(document_text),
                            exclusion_writer=writer)
    return step.run(docs, rank=shard, world_size=1)


def minhash_signatures(task: SignatureTask) -> dict:
    """Stage 3 for one shard."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    work, shard = Path(task.work), task.shard
    docs = curated_documents(work, shard)
    if task.exact:
        docs = _exact_filtered(work, shard, docs)
    MinhashDedupSignature(_dir(work, "minhash", "sigs"), _minhash(task.minhash),
                          language=task.language).run(docs, rank=shard,
                                                         world_size=task.num_shards)
    return {}


def minhash_bucket(task: BucketTask) -> dict:
    """Stage 4 for one LSH band."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

    work, cfg = Path(task.work), task.minhash
    MinhashDedupBuckets(_dir(work, "minhash", "sigs"), _dir(work, "minhash", "buckets"),
                        config=_minhash(cfg)).run(None, rank=task.bucket,
                                                  world_size=cfg.num_buckets)
    return {}


def minhash_cluster(work: Path, cfg: MinhashConfig) -> None:
    from datatrove.pipeline.dedup.minhash import MinhashDedupCluster

    MinhashDedupCluster(_dir(work, "minhash", "buckets"), _dir(work, "minhash", "remove"),
                        config=_minhash(cfg)).run(None, 0, 1)


def deduplicated_texts(work: Path, shard: int, exact: bool, minhash: bool,
                       counts: Dict[str, int]) -> Iterator[str]:
    """Curated documents of a shard minus the duplicates found; what was removed is written
    to removed/<exact|minhash>/ and counted in `counts`."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupFilter

    docs = curated_documents(work, shard)
    writers = []
    if exact:
        writers.append(_removed_out(work, "exact_dedup", shard))
        docs = _exact_filtered(work, shard, docs, writers[-1])
    if minhash:
        writers.append(_removed_out(work, "minhash_dedup", shard))
        docs = MinhashDedupFilter(_dir(work, "minhash", "remove"),
                                  exclusion_writer=writers[-1]).run(docs, rank=shard)
    for doc in docs:
        yield doc.text
    for writer in writers:
        writer.commit()
        counts[writer.reason] = writer.count
