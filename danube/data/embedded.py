"""The embedded default corpus: text every Python installation ships, no download.

Standard-library docstrings are the prose, its source files the code: natural language plus
code, the TinyLlama recipe (SlimPajama + StarCoder, 7:3) in miniature. On first use we train
a byte-level BPE on it and write two Megatron indexed datasets, `prose` and `code`, into a
cache directory keyed by the Python version, the file list and the vocabulary size; later
runs reuse them. The build writes to a temporary directory and renames it into place, so an
interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from danube.data.tokenizer import Tokenizer, load_tokenizer, train_byte_level_bpe

_BUILD_VERSION = 1  # bump when the corpus or its tokenization changes
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
SOURCES = ("prose", "code")


def default_cache_dir() -> Path:
    return Path(os.environ.get("DANUBE_CACHE", Path.home() / ".cache" / "danube"))


@functools.lru_cache(maxsize=1)
def _stdlib_relative_paths() -> tuple:
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]  # pruned, not walked (site-packages)
        rel = os.path.relpath(folder, root)
        found += [name if rel == "." else os.path.join(rel, name)
                  for name in names if name.endswith(".py")]
    return tuple(sorted(found))


def stdlib_files() -> List[Path]:
    """The standard library's .py files, tests excluded, in a stable order (by relative path).
    Walked once per process with the skipped folders pruned: a recursive glob filtered
    afterwards walked site-packages too and took ~1 s per call."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [root / rel for rel in _stdlib_relative_paths()]


def _docstrings(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                yield doc


def read_documents(files: List[Path]) -> Dict[str, List[str]]:
    """One prose document (its docstrings) and one code document (its source) per module."""
    docs: Dict[str, List[str]] = {"prose": [], "code": []}
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue  # a few stdlib files are deliberately non-UTF-8 or py2 samples
        prose = "\n\n".join(_docstrings(tree))
        if prose:
            docs["prose"].append(prose)
        if source.strip():
            docs["code"].append(source)
    return docs


def cache_key(files: List[Path], vocab_size: int) -> str:
    digest = hashlib.sha256(f"{_BUILD_VERSION}|{sys.version}|{vocab_size}".encode())
    for path in files:
        digest.update(f"{path}|{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def _write_indexed(prefix: Path, documents: List[str], tokenizer: Tokenizer) -> int:
    """Tokenize documents (EOD appended to each) into <prefix>.bin/.idx; returns tokens."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    total = 0
    for start in range(0, len(documents), 256):
        for ids in tokenizer.tokenize_batch(documents[start:start + 256]):
            ids.append(tokenizer.eod)
            builder.add_document(ids, [len(ids)])
            total += len(ids)
    builder.finalize(str(prefix) + ".idx")
    return total


def build_embedded_corpus(out_dir: Path, vocab_size: int, files: List[Path]) -> dict:
    """Train the tokenizer and write prose/code datasets into out_dir (which must exist)."""
    docs = read_documents(files)
    tokenizer = train_byte_level_bpe(docs["prose"] + docs["code"], vocab_size)
    tokenizer.save(out_dir / "tokenizer.json")
    manifest = {"python": sys.version, "vocab_size": tokenizer.vocab_size, "files": len(files)}
    for source in SOURCES:
        manifest[source] = {
            "documents": len(docs[source]),
            "tokens": _write_indexed(out_dir / source, docs[source], tokenizer),
        }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def ensure_embedded_corpus(vocab_size: int, cache_dir: Path | None = None) -> Path:
    """The cached corpus directory for this Python and vocabulary size, built if missing."""
    files = stdlib_files()
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / f"embedded-v{vocab_size}-{cache_key(files, vocab_size)}"
    if (final / "manifest.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        build_embedded_corpus(tmp, vocab_size, files)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "manifest.json").is_file():  # not a concurrent builder's result
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def embedded_tokenizer(corpus_dir: Path) -> Tokenizer:
    return load_tokenizer(corpus_dir / "tokenizer.json")


def embedded_prefix(corpus_dir: Path, source: str) -> str:
    """`embedded:<source>` -> the real <prefix> of its .bin/.idx files."""
    return str(corpus_dir / source)


def manifest(corpus_dir: Path) -> dict:
    """What the build wrote: documents and tokens per source, vocabulary size, Python."""
    return json.loads((corpus_dir / "manifest.json").read_text())
