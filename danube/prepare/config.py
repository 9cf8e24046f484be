"""Typed schema of a data-preparation config (configs/data/*.yaml), and its pure checks.

Layout: named `sources` (each becomes one Megatron prefix), the parameters of every curation
step once (`filters`, `dedup`; a source lists which it applies), `tokenizer`, `tokenization`.
Filter thresholds default to datatrove's, which are the published Gopher (Rae et al. 2021,
app. A) and C4 (Raffel et al. 2020, sec. 2.2) values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import MISSING

FILTERS = ("gopher_quality", "gopher_repetition", "c4_quality", "language_id")
DEDUP = ("exact", "minhash")
FORMATS = ("auto", "jsonl", "parquet", "text", "hf_dataset")
ON_ERROR = ("raise", "skip")


@dataclass
class SourceConfig:
    name: str = MISSING
    """Source name: the output prefix is <output_dir>/<name>_text_document."""
    paths: List[str] = MISSING
    """Files, directories (read recursively) and globs; relative to the working directory."""
    format: str = "auto"
    """auto (from the extension) | jsonl | parquet | text (one document per file) |
    hf_dataset (a directory written by datasets' save_to_disk). .gz/.zst are decompressed."""
    text_field: str = "text"
    """Field (JSONL) or column (Parquet, hf_dataset) holding the document text."""
    weight: float = 1.0
    """Blend weight written into the pretraining data config (e.g. web 0.7, code 0.3)."""
    filters: List[str] = field(default_factory=list)
    """Curation filters applied in this order: gopher_quality, gopher_repetition,
    c4_quality, language_id. Parameters live under `filters`."""
    dedup: List[str] = field(default_factory=list)
    """Deduplication within this source: exact and/or minhash (near duplicates)."""


@dataclass
class GopherQualityConfig:
    min_doc_words: int = 50
    """Fewest words (excluding symbols) a document may have."""
    max_doc_words: int = 100000
    """Most words a document may have."""
    min_avg_word_length: float = 3
    """Shortest mean word length, characters."""
    max_avg_word_length: float = 10
    """Longest mean word length, characters."""
    max_symbol_word_ratio: float = 0.1
    """Most '#' or '...' per word."""
    max_bullet_lines_ratio: float = 0.9
    """Largest fraction of lines starting with a bullet."""
    max_ellipsis_lines_ratio: float = 0.3
    """Largest fraction of lines ending with an ellipsis."""
    max_non_alpha_words_ratio: float = 0.8
    """Smallest fraction of words holding an alphabetic character (datatrove's name)."""
    min_stop_words: int = 2
    """Fewest English stop words (the, be, to, of, and, that, have, with)."""


@dataclass
class GopherRepetitionConfig:
    dup_line_frac: float = 0.3
    """Largest fraction of lines that repeat another line."""
    dup_para_frac: float = 0.3
    """Largest fraction of paragraphs that repeat another paragraph."""
    dup_line_char_frac: float = 0.2
    """Largest fraction of characters in repeated lines."""
    dup_para_char_frac: float = 0.2
    """Largest fraction of characters in repeated paragraphs."""


@dataclass
class C4QualityConfig:
    min_num_sentences: int = 5
    """Fewest sentences a document may keep."""
    min_words_per_line: int = 3
    """Lines with fewer words are dropped from the document."""
    max_word_length: int = 1000
    """Lines with a longer word are dropped."""
    filter_no_terminal_punct: bool = True
    """Drop lines that do not end in terminal punctuation."""
    filter_lorem_ipsum: bool = True
    """Drop documents containing 'lorem ipsum'."""
    filter_javascript: bool = True
    """Drop lines mentioning javascript."""
    filter_curly_bracket: bool = True
    """Drop documents containing '{' (C4's code heuristic: never use on code sources)."""
    filter_policy: bool = True
    """Drop lines with cookie/terms-of-use boilerplate."""


@dataclass
class LanguageIdConfig:
    model_path: Optional[str] = None
    """A fastText language-ID model file you supply (e.g. lid.176.bin from
    https://fasttext.cc/docs/en/language-identification.html). Required for language_id."""
    languages: List[str] = field(default_factory=lambda: ["en"])
    """Languages to keep (the model's labels without __label__)."""
    min_score: float = 0.65
    """Lowest probability of a kept language."""


@dataclass
class FiltersConfig:
    language: str = "en"
    """Language of the word tokenizer (spaCy, blank model) the filters and MinHash use."""
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    """Gopher quality rules."""
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    """Gopher repetition rules (n-gram tables at datatrove's Gopher defaults)."""
    c4_quality: C4QualityConfig = field(default_factory=C4QualityConfig)
    """C4 line and document rules."""
    language_id: LanguageIdConfig = field(default_factory=LanguageIdConfig)
    """fastText language identification."""


@dataclass
class MinhashConfig:
    n_grams: int = 5
    """Word n-gram size of the shingles."""
    num_buckets: int = 14
    """LSH bands; with 8 hashes each, pairs of similarity 0.8 are caught with p = 0.92."""
    hashes_per_bucket: int = 8
    """Hashes per band."""
    seed: int = 1
    """Seed of the hash permutations."""


@dataclass
class DedupConfig:
    minhash: MinhashConfig = field(default_factory=MinhashConfig)
    """Near-duplicate detection (datatrove's MinHash, FineWeb parameters)."""


@dataclass
class PrepTokenizerConfig:
    path: Optional[str] = None
    """Load this tokenizer: a tokenizer.json, a directory holding one, or a SentencePiece
    .model (Llama 2 / Mistral). null: train a byte-level BPE from the sources."""
    vocab_size: int = 32000
    """Vocabulary size to train, special tokens included."""
    train_sample_mb: float = 100.0
    """Text (MB) sampled from the curated sources, in proportion to their weights, to train."""
    add_bos: Optional[bool] = None
    """Prepend the beginning-of-sequence token to every document, so that continued
    pretraining of a Llama/Mistral model sees the format it sees at inference. null: what the
    tokenizer's own config says (tokenizer_config.json `add_bos_token`; a SentencePiece .model
    without one: true, as Llama 2 / Mistral); false for a tokenizer trained here."""


@dataclass
class TokenizationConfig:
    append_eod: bool = True
    """Append the end-of-document token to every document (Megatron's --append-eod)."""
    shard_size_mb: float = 16.0
    """Text MB per shard (a compressed file counts the size its gzip/zstd header records, or
    4x its own; it is never split): the unit of parallel work and of resume. Small enough
    that the shards balance over the workers (the largest start first)."""
    batch_size: int = 256
    """Documents per tokenizer call."""


@dataclass
class PrepareConfig:
    name: str = "data"
    """Name of this dataset build (printed and reported)."""
    output_dir: str = MISSING
    """Where the tokenizer, the .bin/.idx prefixes, reports and work files go."""
    sources: List[SourceConfig] = MISSING
    """The named inputs; each becomes its own prefix."""
    num_workers: Optional[int] = None
    """Worker processes; null: one per CPU core. 1 runs in this process."""
    on_error: str = "raise"
    """raise: stop at the first bad record, naming file and line | skip: count it and go on."""
    overwrite: bool = False
    """Replace outputs that were built from a different config or inputs."""
    pretrain_config: str = "danube_tiny"
    """Pretraining config that the written pretrain_data.yaml extends."""
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    """Parameters of the curation filters (a source chooses which to apply)."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Parameters of the deduplication steps."""
    tokenizer: PrepTokenizerConfig = field(default_factory=PrepTokenizerConfig)
    """Tokenizer to load or train."""
    tokenization: TokenizationConfig = field(default_factory=TokenizationConfig)
    """How documents become tokens."""


def prefix_of(out: Path, source: str) -> Path:
    """A source's Megatron prefix: <out>/<source>_text_document(.bin/.idx)."""
    return out / f"{source}_text_document"


def validate_prepare(cfg: PrepareConfig) -> List[str]:
    """Every problem of the config itself (no file reads beyond existence checks)."""
    problems: List[str] = []
    if not cfg.sources:
        problems.append("sources is empty: give at least one {name, paths}")
    names = [s.name for s in cfg.sources]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"sources: the name {dup!r} is used twice; names must be unique")
    for i, src in enumerate(cfg.sources):
        key = f"sources[{i}] ({src.name})"
        if not src.name or not src.name.replace("_", "").replace("-", "").isalnum():
            problems.append(f"{key}.name must be letters, digits, '_' or '-'")
        if not src.paths:
            problems.append(f"{key}.paths is empty")
        if src.format not in FORMATS:
            problems.append(f"{key}.format={src.format!r}; use one of {', '.join(FORMATS)}")
        if not src.weight > 0:
            problems.append(f"{key}.weight must be > 0 (got {src.weight})")
        for name in src.filters:
            if name not in FILTERS:
                problems.append(f"{key}.filters: unknown filter {name!r}; known: "
                                f"{', '.join(FILTERS)}")
        for name in src.dedup:
            if name not in DEDUP:
                problems.append(f"{key}.dedup: unknown step {name!r}; known: {', '.join(DEDUP)}")
        if "language_id" in src.filters and not cfg.filters.language_id.model_path:
            problems.append(
                f"{key} uses language_id but filters.language_id.model_path is not set: "
                "language ID needs a fastText model file you supply (e.g. lid.176.bin from "
                "https://fasttext.cc/docs/en/language-identification.html); set the path or "
                "remove language_id from the source's filters")
    lid = cfg.filters.language_id.model_path
    if lid and any("language_id" in s.filters for s in cfg.sources) and not Path(lid).is_file():
        problems.append(f"filters.language_id.model_path: no file at {lid}")
    if cfg.on_error not in ON_ERROR:
        problems.append(f"on_error={cfg.on_error!r}; use raise or skip")
    if cfg.num_workers is not None and cfg.num_workers < 1:
        problems.append(f"num_workers must be >= 1 or null (got {cfg.num_workers})")
    if cfg.tokenizer.path is None and not 300 <= cfg.tokenizer.vocab_size <= 1 << 20:
        problems.append(f"tokenizer.vocab_size={cfg.tokenizer.vocab_size}: train at least 300 "
                        "(256 bytes + special tokens)")
    if cfg.tokenizer.path and not os.path.exists(cfg.tokenizer.path):
        problems.append(f"tokenizer.path: nothing at {cfg.tokenizer.path}")
    if not cfg.tokenization.shard_size_mb > 0 or cfg.tokenization.batch_size < 1:
        problems.append("tokenization.shard_size_mb and batch_size must be positive")
    mh = cfg.dedup.minhash
    if min(mh.n_grams, mh.num_buckets, mh.hashes_per_bucket) < 1:
        problems.append("dedup.minhash: n_grams, num_buckets, hashes_per_bucket must be >= 1")
    return problems


# --- composing configs/data/ (Hydra): registered here, above config/ ---------------------------

def _register() -> None:
    from danube.config.compose import PREPARE_SCHEMA_NAME, add_schema

    add_schema(PREPARE_SCHEMA_NAME, PrepareConfig)


_register()


def to_prepare_config(cfg) -> PrepareConfig:
    """Resolve interpolations and return the typed data-preparation dataclass."""
    from danube.config.compose import PREPARE_SCHEMA_NAME, _typed

    return _typed(cfg, PrepareConfig, PREPARE_SCHEMA_NAME)


def compose_prepare_config(config_name: str, overrides: Optional[List[str]] = None,
                           config_dir: Optional[str] = None) -> PrepareConfig:
    """Compose a configs/data/ config like launchers/prepare_data.py does."""
    from danube.config.compose import DATA_CONFIG_DIR, _compose

    return to_prepare_config(_compose(config_dir or DATA_CONFIG_DIR, config_name, overrides))
