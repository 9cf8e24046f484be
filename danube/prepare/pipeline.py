"""The data stage end to end: plan -> curate -> tokenizer -> tokenize -> merge -> report.

Output directory layout:
  tokenizer/                      HF tokenizer (tokenizer.json, tokenizer_config.json, ...)
  <source>_text_document.bin/.idx one Megatron prefix per source
  report.json, manifest.json      what was done / what each output was built from
  pretrain_data.yaml              a pretraining config using these prefixes with their weights
  work/<source>/<curation fp>/    curated and removed documents, dedup files, token shards

Resume: every shard (and every single-task stage) leaves a `.done.json` marker when its files
are in place, and a re-run skips what is marked. Work directories are named by the
fingerprint of everything that shapes them (inputs' paths, sizes and mtimes; the config
keys that matter), so a changed config never mixes with old shards; an output built from a
different fingerprint is never replaced unless `overwrite=true`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, List, Optional

from omegaconf import OmegaConf

from danube.config.validate import ConfigError
from danube.data.tokenizer import load_tokenizer
from danube.prepare import curate
from danube.prepare.config import PrepareConfig, SourceConfig, prefix_of, validate_prepare
from danube.prepare.report import format_report, source_report
from danube.prepare.sources import Reader, file_identity, list_files, plan_shards
from danube.prepare.tokenize import build_prefix, cached_tokenizer, tokenize_documents

MANIFEST = "manifest.json"


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class SourcePlan:
    """A source's files, shards and fingerprints (computed before any work starts)."""

    def __init__(self, src: SourceConfig, cfg: PrepareConfig, files, shards):
        self.src, self.files, self.shards = src, files, shards
        used = {name: asdict(getattr(cfg.filters, name)) for name in src.filters}
        self.curation_fp = fingerprint({
            "inputs": file_identity(files), "text_field": src.text_field, "format": src.format,
            "filters": src.filters, "params": used, "language": cfg.filters.language,
            "dedup": src.dedup, "minhash": asdict(cfg.dedup.minhash) if "minhash" in src.dedup
            else None, "on_error": cfg.on_error, "shards": shards})
        self.work = Path(cfg.output_dir) / "work" / src.name / self.curation_fp
        self.curated = bool(src.filters or src.dedup)
        self.costs = [sum(piece["size"] for piece in shard) for shard in shards]  # text bytes
        self.token_fp = ""

    def set_tokenizer(self, tokenizer_fp: str, append_eod: bool, add_bos: bool) -> None:
        self.tokenizer_fp = tokenizer_fp
        self.add_bos = add_bos
        # add_bos joins the fingerprint only when set, so outputs built before it stay valid
        self.token_fp = fingerprint([self.curation_fp, tokenizer_fp, append_eod]
                                    + (["bos"] if add_bos else []))
        self.tokens = self.work / f"tokens-{self.token_fp}"


def tokenizer_fingerprint(cfg: PrepareConfig, plans: List[SourcePlan]) -> str:
    tok = cfg.tokenizer
    if tok.path:
        path = Path(tok.path)
        path = path / "tokenizer.json" if path.is_dir() else path
        return fingerprint(["load", hashlib.sha256(path.read_bytes()).hexdigest()])
    return fingerprint(["train", tok.vocab_size, tok.train_sample_mb,
                        [[p.src.name, p.src.weight, p.curation_fp] for p in plans]])


def wants_bos(tok) -> bool:
    """`tokenizer.add_bos`, or (null) what the tokenizer's own files say: tokenizer_config.json's
    `add_bos_token` (Llama/Mistral: true); a SentencePiece .model without one: true (Llama 2 /
    Mistral's convention); a tokenizer trained here or with no such key: false."""
    if tok.add_bos is not None:
        return tok.add_bos
    if not tok.path:
        return False
    path = Path(tok.path)
    config = (path if path.is_dir() else path.parent) / "tokenizer_config.json"
    if config.is_file():
        declared = json.loads(config.read_text()).get("add_bos_token")
        if declared is not None:
            return bool(declared)
    return path.suffix == ".model"


def _bos_problem(tok) -> List[str]:
    if not tok.path or not wants_bos(tok) or not Path(tok.path).exists():
        return []
    if load_tokenizer(tok.path).bos is None:
        return [f"tokenizer.add_bos: {tok.path} has no beginning-of-sequence token (<s>, "
                "<|begin_of_text|>, <bos>); set tokenizer.add_bos=false"]
    return []


def plan_prepare(cfg: PrepareConfig) -> List[SourcePlan]:
    """Validate the config, find the inputs, check the output directory: one ConfigError with
    every problem, before anything is read or written."""
    problems = validate_prepare(cfg)
    plans = []
    if not problems:
        for src in cfg.sources:
            files, found = list_files(src)
            problems += found
            if not found:
                plans.append(SourcePlan(src, cfg, files,
                                        plan_shards(files, cfg.tokenization.shard_size_mb)))
    if not problems:
        problems += _bos_problem(cfg.tokenizer)
    if not problems:
        tokenizer_fp = tokenizer_fingerprint(cfg, plans)
        add_bos = wants_bos(cfg.tokenizer)
        for plan in plans:
            plan.set_tokenizer(tokenizer_fp, cfg.tokenization.append_eod, add_bos)
        problems += output_problems(cfg, plans, tokenizer_fp)
    if problems:
        raise ConfigError(problems)
    return plans


def output_problems(cfg: PrepareConfig, plans: List[SourcePlan], tokenizer_fp: str) -> List[str]:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        return [f"output_dir {out} is a file; choose a directory"]
    if not out.is_dir() or not any(out.iterdir()):
        return []
    if not (out / MANIFEST).is_file():
        return [f"output_dir {out} is not empty and holds no {MANIFEST}: it is not a danube "
                "data directory; choose a new or empty directory"]
    if cfg.overwrite:
        return []
    manifest = json.loads((out / MANIFEST).read_text())
    fix = "use a new output_dir, or set overwrite=true to replace it"
    problems = []
    if manifest.get("tokenizer") not in (None, tokenizer_fp):
        problems.append(f"{out}/tokenizer was built from a different tokenizer config or "
                        f"sources; {fix}")
    for plan in plans:
        done = manifest.get("sources", {}).get(plan.src.name)
        if done and done["fingerprint"] != plan.token_fp:
            problems.append(f"{prefix_of(out, plan.src.name)} was built from a different config "
                            f"or different inputs (source {plan.src.name}); {fix}")
    return problems


def _quiet_logs() -> None:
    """datatrove logs every stage at INFO (and installs its handler on import) and draws
    progress bars; our own progress lines say enough."""
    import datatrove.utils.logging  # noqa: F401  (adds its handler: import before removing)
    from loguru import logger

    os.environ.setdefault("TQDM_DISABLE", "1")
    logger.remove()
    logger.add(sys.stderr, level="ERROR")


def _worker_init() -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # one tokenizer thread per worker process
    _quiet_logs()


def _import_engine() -> None:
    # torch + megatron-core take ~5 s of CPU to import; the main process needs them only to
    # build the prefixes at the end, so it imports them while the workers tokenize, at the
    # lowest priority: it takes the CPU that the workers leave idle (while they start, and
    # around the last shards). Only this thread is reniced (Linux: nice is per thread).
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    import megatron.core.datasets.indexed_dataset  # noqa: F401


def _ready() -> None:
    pass


class Runner:
    """Runs per-shard tasks inline (one worker) or in spawned processes; marks each done."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None if workers == 1 else ProcessPoolExecutor(
            workers, mp_context=get_context("spawn"), initializer=_worker_init)
        if self.pool is not None:  # start the workers now, while we plan
            for _ in range(workers):
                self.pool.submit(_ready)
            threading.Thread(target=_import_engine, daemon=True).start()

    def stage(self, label: str, fn: Callable[[dict], dict], tasks: List[dict],
              markers: List[Path], costs: Optional[List[float]] = None) -> List[dict]:
        """Results in task order; with `costs`, the costliest tasks are started first (so that
        the last ones to finish are small and no worker idles long at the end)."""
        results: Dict[int, dict] = {}
        todo = []
        for i, marker in enumerate(markers):
            if marker.is_file():
                results[i] = json.loads(marker.read_text())
            else:
                todo.append(i)
        resumed = len(results)

        def finish(i: int, result: dict) -> None:
            markers[i].parent.mkdir(parents=True, exist_ok=True)
            _write_json(markers[i], result)
            results[i] = result

        if self.pool is None:
            for i in todo:
                finish(i, fn(tasks[i]))
        else:
            if costs is not None:
                todo.sort(key=lambda i: -costs[i])
            futures = {self.pool.submit(fn, tasks[i]): i for i in todo}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()
                    finish(futures[future], future.result())
        note = f" ({resumed} already done)" if resumed else ""
        print(f"  {label}: {len(markers)} task(s){note}", flush=True)
        return [results[i] for i in range(len(markers))]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _once(marker: Path, fn: Callable[[], None]) -> None:
    if not marker.is_file():
        fn()
        marker.parent.mkdir(parents=True, exist_ok=True)
        _write_json(marker, {})


def curate_source(plan: SourcePlan, cfg: PrepareConfig, runner: Runner) -> List[dict]:
    src, work, n = plan.src, plan.work, len(plan.shards)
    done = work / "done"
    exact, minhash = "exact" in src.dedup, "minhash" in src.dedup
    base = {"work": str(work), "num_shards": n, "exact": exact, "minhash": cfg.dedup.minhash,
            "language": cfg.filters.language}
    stats = runner.stage(f"{src.name} filter", curate.filter_shard, [
        {**base, "shard": i, "pieces": pieces, "text_field": src.text_field,
         "on_error": cfg.on_error, "filters": list(src.filters), "filters_cfg": cfg.filters}
        for i, pieces in enumerate(plan.shards)], [done / f"filter-{i:05d}.json" for i in range(n)],
        plan.costs)
    if exact:
        _once(done / "exact-find.json", lambda: curate.exact_find(work))
    if minhash:
        runner.stage(f"{src.name} minhash signatures", curate.minhash_signatures,
                     [{**base, "shard": i} for i in range(n)],
                     [done / f"minhash-sig-{i:05d}.json" for i in range(n)], plan.costs)
        buckets = cfg.dedup.minhash.num_buckets
        runner.stage(f"{src.name} minhash buckets", curate.minhash_bucket,
                     [{**base, "bucket": b} for b in range(buckets)],
                     [done / f"minhash-bucket-{b:03d}.json" for b in range(buckets)])
        _once(done / "minhash-cluster.json",
              lambda: curate.minhash_cluster(work, cfg.dedup.minhash))
    return stats


def prepare_tokenizer(cfg: PrepareConfig, plans: List[SourcePlan], out: Path):
    """Load (and convert) or train the tokenizer; saved in HF format at <out>/tokenizer."""
    from danube.conversion.hf_tokenizer import write_hf_tokenizer
    from danube.data.tokenizer import train_byte_level_bpe

    target = out / "tokenizer"
    if cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    else:
        tokenizer = train_byte_level_bpe(_training_sample(cfg, plans), cfg.tokenizer.vocab_size)
    tmp = out / ".tmp-tokenizer"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    write_hf_tokenizer(tmp, tmp, tokenizer, None)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target / "tokenizer.json"


def _training_sample(cfg: PrepareConfig, plans: List[SourcePlan]):
    """Texts in shard order from each source (curated when it is curated), up to its weight's
    share of train_sample_mb; reading stops once a source's share is taken."""
    total = sum(p.src.weight for p in plans)
    for plan in plans:
        budget = cfg.tokenizer.train_sample_mb * (1 << 20) * plan.src.weight / total
        if plan.curated:
            texts = (d.text for shard in range(len(plan.shards))
                     for d in curate.curated_documents(plan.work, shard))
        else:
            reader = Reader(plan.src.text_field, "skip")
            texts = (text for pieces in plan.shards for text, _ in reader.shard(pieces))
        for text in texts:
            if budget <= 0:
                break
            budget -= len(text)
            yield text


def tokenize_shard(task: dict) -> dict:
    """Worker task: the shard's (curated, deduplicated) documents -> <shard>.tokens and
    <shard>.lengths.npy (tokenize_documents)."""
    work, shard = Path(task["work"]), task["shard"]
    tokenizer = cached_tokenizer(task["tokenizer"])
    stats: dict = {}
    if task["curated"]:
        texts = curate.deduplicated_texts(work, shard, task["exact"], task["minhash"], stats)
    else:
        reader = Reader(task["text_field"], task["on_error"])
        texts = (text for text, _ in reader.shard(task["pieces"]))
    result = tokenize_documents(texts, tokenizer, Path(task["prefix"]), task["append_eod"],
                                task["batch_size"], task["add_bos"])
    if not task["curated"]:
        stats = {"documents_in": result["documents_out"], "read_errors": dict(reader.errors),
                 "documents_empty": reader.empty_documents}
    return {**result, "duplicates": stats} if task["curated"] else {**result, **stats}


def tokenize_tasks(plan: SourcePlan, cfg: PrepareConfig, tokenizer_path: Path) -> List[dict]:
    src, tok = plan.src, cfg.tokenization
    plan.tokens.mkdir(parents=True, exist_ok=True)
    return [{"work": str(plan.work), "shard": i, "pieces": pieces, "curated": plan.curated,
             "exact": "exact" in src.dedup, "minhash": "minhash" in src.dedup,
             "text_field": src.text_field, "on_error": cfg.on_error,
             "tokenizer": str(tokenizer_path), "prefix": str(plan.tokens / f"{i:05d}"),
             "append_eod": tok.append_eod, "add_bos": plan.add_bos,
             "batch_size": tok.batch_size}
            for i, pieces in enumerate(plan.shards)]


def build_source_prefix(plan: SourcePlan, stats: List[dict], out: Path, vocab_size: int) -> None:
    parts = [plan.tokens / f"{i:05d}" for i, s in enumerate(stats) if s["documents_out"]]
    if not parts:
        raise ConfigError([f"source {plan.src.name}: no documents left to tokenize (all were "
                           "empty, skipped or removed; see the report's counts and `inspect`)"])
    build_prefix(parts, prefix_of(out, plan.src.name), vocab_size)


def _manifest(out: Path) -> dict:
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {"sources": {}}


def write_pretrain_config(cfg: PrepareConfig, out: Path, plans: List[SourcePlan]) -> Path:
    """pretrain_data.yaml: `python launchers/pretrain.py --config-dir <out> --config-name
    pretrain_data` trains `pretrain_config` on these prefixes with the sources' weights."""
    blend = []
    for plan in plans:
        blend += [plan.src.weight, str(prefix_of(out.resolve(), plan.src.name))]
    text = (
        "# Written by launchers/prepare_data.py. Train on this data with:\n"
        f"#   python launchers/pretrain.py --config-dir {out} --config-name pretrain_data\n"
        f"defaults:\n  - {cfg.pretrain_config}\n  - _self_\n\n"
        "model:\n  tokenizer:\n    library: huggingface\n"
        f"    model: {(out / 'tokenizer').resolve()}\n"
        f"  data:\n    data_prefix: {json.dumps(blend)}\n")
    path = out / "pretrain_data.yaml"
    path.write_text(text)
    return path


def run_prepare(cfg: PrepareConfig) -> dict:
    """Everything the launcher does after parsing: returns the report (also written)."""
    plans = plan_prepare(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(out)
    tokenizer_fp = plans[0].tokenizer_fp  # the same for every source (plan_prepare)
    if manifest.get("tokenizer") != tokenizer_fp:  # new, or overwrite=true: start over
        manifest = {"tokenizer": None, "sources": {}}
    pending = [p for p in plans if manifest["sources"].get(p.src.name, {}).get(
        "fingerprint") != p.token_fp or not _outputs_exist(out, p.src.name)]
    if not pending:
        print(f"{cfg.name}: up to date in {out} (same config and inputs); nothing to do")
        return _finish(cfg, out, plans, manifest)
    _quiet_logs()
    runner = Runner(cfg.num_workers or os.cpu_count() or 1)
    started = time.time()
    try:
        curation = {p.src.name: curate_source(p, cfg, runner) for p in pending if p.curated}
        if manifest.get("tokenizer") == tokenizer_fp and (out / "tokenizer").is_dir():
            tokenizer_path = out / "tokenizer" / "tokenizer.json"
        else:
            tokenizer_path = prepare_tokenizer(cfg, plans, out)
            manifest["tokenizer"] = tokenizer_fp
            _write_json(out / MANIFEST, manifest)
        vocab_size = cached_tokenizer(str(tokenizer_path)).vocab_size
        # every source's shards in one stage, so that no worker idles between sources
        tasks = [tokenize_tasks(plan, cfg, tokenizer_path) for plan in pending]
        markers = [Path(t["prefix"] + ".done.json") for group in tasks for t in group]
        costs = [cost for plan in pending for cost in plan.costs]
        results = runner.stage("tokenize", tokenize_shard, [t for g in tasks for t in g], markers,
                               costs)
        for plan in pending:
            stats, results = results[:len(plan.shards)], results[len(plan.shards):]
            build_source_prefix(plan, stats, out, vocab_size)
            report = source_report(plan, curation.get(plan.src.name), stats)
            manifest["sources"][plan.src.name] = {"fingerprint": plan.token_fp,
                                                  "work": str(plan.work), "report": report}
            _write_json(out / MANIFEST, manifest)
            for stale in plan.work.parent.iterdir():
                if stale != plan.work:
                    shutil.rmtree(stale, ignore_errors=True)
    finally:
        runner.close()
    print(f"{cfg.name}: prepared in {time.time() - started:.1f}s")
    return _finish(cfg, out, plans, manifest)


def _outputs_exist(out: Path, name: str) -> bool:
    prefix = prefix_of(out, name)
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


def _finish(cfg: PrepareConfig, out: Path, plans: List[SourcePlan], manifest: dict) -> dict:
    report = {"name": cfg.name, "output_dir": str(out),
              "tokens": {"add_bos": plans[0].add_bos, "append_eod": cfg.tokenization.append_eod},
              "sources": {p.src.name: manifest["sources"][p.src.name]["report"] for p in plans}}
    _write_json(out / "report.json", report)
    (out / "prepare_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    write_pretrain_config(cfg, out, plans)
    print(format_report(report))
    print(f"\nreport: {out / 'report.json'}\npretrain on it:\n  python launchers/pretrain.py "
          f"--config-dir {out} --config-name pretrain_data")
    return report


