"""Planning the data stage: validate, list inputs, cut shards, fingerprint everything that
shapes an output, check the output directory. One ConfigError with every problem, before
anything is read or written."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import List

from danube.config.validate import ConfigError
from danube.data.tokenizer import load_tokenizer
from danube.prepare.config import PrepareConfig, SourceConfig, prefix_of, validate_prepare
from danube.prepare.sources import file_identity, list_files, plan_shards

MANIFEST = "manifest.json"


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, obj) -> None:
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


