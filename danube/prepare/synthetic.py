"""A generated raw corpus for the demo and the benchmark, built from the Python standard
library (no download): "web" documents (JSONL.gz) made of docstring paragraphs, with the
defects curation exists for mixed in, and "code" documents (Parquet) cut from the sources.

Per 100 web documents, about: 3 exact copies of an earlier one, 4 near copies (a few words
changed), 4 too short for Gopher, 3 made of one repeated line; the rest are distinct.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import List


def _pools() -> tuple:
    from danube.data.embedded import read_documents, stdlib_files  # imports megatron-core

    docs = read_documents(stdlib_files())
    paragraphs = [p.strip() for d in docs["prose"] for p in d.split("\n\n")
                  if len(p.split()) >= 8]
    code_lines = [d.splitlines() for d in docs["code"]]
    return paragraphs, code_lines


def _web_document(rng: random.Random, paragraphs: List[str], earlier: List[str]) -> str:
    roll = rng.random()
    if roll < 0.03 and earlier:
        return rng.choice(earlier)
    if roll < 0.07 and earlier:
        words = rng.choice(earlier).split(" ")
        for _ in range(max(1, len(words) // 100)):
            words[rng.randrange(len(words))] = rng.choice(["alpha", "beta", "gamma", "delta"])
        return " ".join(words)
    if roll < 0.11:
        return " ".join(rng.choice(paragraphs).split()[:rng.randint(3, 20)])
    if roll < 0.14:
        return "\n".join([rng.choice(paragraphs).split("\n")[0]] * rng.randint(5, 30))
    return "\n\n".join(rng.choice(paragraphs) for _ in range(rng.randint(3, 12)))


def write_corpus(out_dir: Path, web_mb: float, code_mb: float, seed: int = 0,
                 file_mb: float = 32.0) -> dict:
    """Write <out>/web/part-*.jsonl.gz and <out>/code/part-*.parquet; returns counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    paragraphs, code_lines = _pools()
    out_dir = Path(out_dir)
    (out_dir / "web").mkdir(parents=True, exist_ok=True)
    (out_dir / "code").mkdir(parents=True, exist_ok=True)
    counts = {"web_documents": 0, "code_documents": 0}
    written, part, earlier = 0, 0, []
    while written < web_mb * (1 << 20):
        with gzip.open(out_dir / "web" / f"part-{part:04d}.jsonl.gz", "wt", compresslevel=1) as f:
            size = 0
            while size < file_mb * (1 << 20) and written + size < web_mb * (1 << 20):
                text = _web_document(rng, paragraphs, earlier)
                earlier = (earlier + [text])[-200:]
                line = json.dumps({"text": text, "id": f"web-{counts['web_documents']}"})
                f.write(line + "\n")
                size += len(line)
                counts["web_documents"] += 1
        written += size
        part += 1
    written, part = 0, 0
    while written < code_mb * (1 << 20):
        rows = []
        size = 0
        while size < file_mb * (1 << 20) and written + size < code_mb * (1 << 20):
            lines = rng.choice(code_lines)
            start = rng.randrange(max(1, len(lines) - 40))
            rows.append("\n".join(lines[start:start + rng.randint(20, 200)]))
            size += len(rows[-1])
        pq.write_table(pa.table({"content": rows}), out_dir / "code" / f"part-{part:04d}.parquet",
                       row_group_size=1000)
        counts["code_documents"] += len(rows)
        written += size
        part += 1
    return counts
