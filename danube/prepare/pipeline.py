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

import json
import os
import shutil
import time
from pathlib import Path
from typing import List

from omegaconf import OmegaConf

from danube.config.validate import ConfigError
from danube.data.tokenizer import load_tokenizer
from danube.prepare import curate
from danube.prepare.config import PrepareConfig, prefix_of
from danube.prepare.plan import MANIFEST, SourcePlan, plan_prepare, write_json
from danube.prepare.report import format_report, source_report
from danube.prepare.runner import Runner, once, quiet_logs
from danube.prepare.sources import Reader
from danube.prepare.tasks import BucketTask, FilterTask, SignatureTask, TokenizeTask
from danube.prepare.tokenize import build_prefix, cached_tokenizer, tokenize_shard


def curate_source(plan: SourcePlan, cfg: PrepareConfig, runner: Runner) -> List[dict]:
    src, work, n = plan.src, plan.work, len(plan.shards)
    done = work / "done"
    exact, minhash = "exact" in src.dedup, "minhash" in src.dedup
    stats = runner.stage(f"{src.name} filter", curate.filter_shard, [
        FilterTask(str(work), i, n, pieces, src.text_field, cfg.on_error, list(src.filters),
                   cfg.filters, exact)
        for i, pieces in enumerate(plan.shards)], [done / f"filter-{i:05d}.json" for i in range(n)],
        plan.costs)
    if exact:
        once(done / "exact-find.json", lambda: curate.exact_find(work))
    if minhash:
        runner.stage(f"{src.name} minhash signatures", curate.minhash_signatures,
                     [SignatureTask(str(work), i, n, exact, cfg.dedup.minhash,
                                    cfg.filters.language) for i in range(n)],
                     [done / f"minhash-sig-{i:05d}.json" for i in range(n)], plan.costs)
        buckets = cfg.dedup.minhash.num_buckets
        runner.stage(f"{src.name} minhash buckets", curate.minhash_bucket,
                     [BucketTask(str(work), b, cfg.dedup.minhash) for b in range(buckets)],
                     [done / f"minhash-bucket-{b:03d}.json" for b in range(buckets)])
        once(done / "minhash-cluster.json",
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


def tokenize_tasks(plan: SourcePlan, cfg: PrepareConfig,
                   tokenizer_path: Path) -> List[TokenizeTask]:
    src, tok = plan.src, cfg.tokenization
    plan.tokens.mkdir(parents=True, exist_ok=True)
    return [TokenizeTask(str(plan.work), i, pieces, plan.curated, "exact" in src.dedup,
                         "minhash" in src.dedup, src.text_field, cfg.on_error,
                         str(tokenizer_path), str(plan.tokens / f"{i:05d}"), tok.append_eod,
                         plan.add_bos, tok.batch_size)
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
    quiet_logs()
    runner = Runner(cfg.num_workers or os.cpu_count() or 1)
    started = time.time()
    try:
        curation = {p.src.name: curate_source(p, cfg, runner) for p in pending if p.curated}
        if manifest.get("tokenizer") == tokenizer_fp and (out / "tokenizer").is_dir():
            tokenizer_path = out / "tokenizer" / "tokenizer.json"
        else:
            tokenizer_path = prepare_tokenizer(cfg, plans, out)
            manifest["tokenizer"] = tokenizer_fp
            write_json(out / MANIFEST, manifest)
        vocab_size = cached_tokenizer(str(tokenizer_path)).vocab_size
        # every source's shards in one stage, so that no worker idles between sources
        tasks = [tokenize_tasks(plan, cfg, tokenizer_path) for plan in pending]
        markers = [Path(t.prefix + ".done.json") for group in tasks for t in group]
        costs = [cost for plan in pending for cost in plan.costs]
        results = runner.stage("tokenize", tokenize_shard, [t for g in tasks for t in g], markers,
                               costs)
        for plan in pending:
            stats, results = results[:len(plan.shards)], results[len(plan.shards):]
            build_source_prefix(plan, stats, out, vocab_size)
            report = source_report(plan, curation.get(plan.src.name), stats)
            manifest["sources"][plan.src.name] = {"fingerprint": plan.token_fp,
                                                  "work": str(plan.work), "report": report}
            write_json(out / MANIFEST, manifest)
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
    write_json(out / "report.json", report)
    (out / "prepare_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    write_pretrain_config(cfg, out, plans)
    print(format_report(report))
    print(f"\nreport: {out / 'report.json'}\npretrain on it:\n  python launchers/pretrain.py "
          f"--config-dir {out} --config-name pretrain_data")
    return report


