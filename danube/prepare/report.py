"""Per-source counts (JSON) and the printed table: documents in, skipped, removed per filter,
duplicates, documents and tokens out."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import List, Optional

from danube.prepare.config import prefix_of


def _sum(stats: List[dict], key: str) -> int:
    return sum(s.get(key, 0) for s in stats)


def _merge(stats: List[dict], key: str) -> dict:
    total: Counter = Counter()
    for s in stats:
        total.update(s.get(key, {}))
    return dict(total)


def source_report(plan, curation: Optional[List[dict]], tokens: List[dict]) -> dict:
    """One source's counts from its per-shard stage results."""
    first = curation if curation is not None else tokens
    return {
        "files": len(plan.files),
        "shards": len(plan.shards),
        "documents_in": _sum(first, "documents_in"),
        "read_errors_skipped": _merge(first, "read_errors"),
        "documents_empty": _sum(first, "documents_empty"),
        "removed": {name: _sum([s["removed"] for s in curation], name)
                    for name in plan.src.filters} if curation else {},
        "removed_reasons": _merge(curation, "removed_reasons") if curation else {},
        "duplicates": _merge(tokens, "duplicates"),
        "documents_out": _sum(tokens, "documents_out"),
        "tokens_out": _sum(tokens, "tokens_out"),
        "prefix": prefix_of(Path(), plan.src.name).name,
        "weight": plan.src.weight,
    }


def format_report(report: dict) -> str:
    """A table: one column per source, one row per count."""
    sources = report["sources"]
    names = list(sources)
    rows = [("documents in", [r["documents_in"] for r in sources.values()])]
    errors = sorted({k for r in sources.values() for k in r["read_errors_skipped"]})
    rows += [(f"  skipped: {k}", [r["read_errors_skipped"].get(k, 0) for r in sources.values()])
             for k in errors]
    rows.append(("  empty documents", [r["documents_empty"] for r in sources.values()]))
    filters = list(dict.fromkeys(k for r in sources.values() for k in r["removed"]))
    rows += [(f"  removed: {k}", [r["removed"].get(k) for r in sources.values()])
             for k in filters]
    dups = list(dict.fromkeys(k for r in sources.values() for k in r["duplicates"]))
    rows += [(f"  removed: {k}", [r["duplicates"].get(k) for r in sources.values()])
             for k in dups]
    rows.append(("documents out", [r["documents_out"] for r in sources.values()]))
    rows.append(("tokens out", [r["tokens_out"] for r in sources.values()]))
    rows.append(("weight", [r["weight"] for r in sources.values()]))
    if "tokens" in report:
        marks = report["tokens"]
        rows.append(("BOS first / EOD last", [f"{'yes' if marks['add_bos'] else 'no'} / "
                                               f"{'yes' if marks['append_eod'] else 'no'}"]
                     * len(names)))
    width = max(len(label) for label, _ in rows) + 2
    cols = [max(len(n), 12) for n in names]

    def cell(value, w: int) -> str:
        text = "-" if value is None else (f"{value:,}" if isinstance(value, int) else str(value))
        return text.rjust(w)

    lines = [" " * width + "  ".join(n.rjust(w) for n, w in zip(names, cols))]
    lines += [label.ljust(width) + "  ".join(cell(v, w) for v, w in zip(values, cols))
              for label, values in rows]
    return "\n".join(lines)
