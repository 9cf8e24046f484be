"""Raw inputs: find the files of a source, cut them into shards, read documents back.

A shard is a list of pieces (a whole file, or a newline-aligned byte range of a large
uncompressed JSONL file), packed in file order up to `shard_size_mb`. Shards are the unit of
parallel work and of resume; the plan depends only on the inputs and the shard size, never on
the number of workers, which is why parallel output equals single-process output.

Readers stream (one line, one Parquet batch or one Arrow batch at a time) and yield
`(text, ref)`, ref naming the file and line (or row) for reports and `inspect`. A bad record
raises `DataError` naming file and line, or with on_error=skip is counted under its kind.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import orjson

from danube.prepare.config import SourceConfig

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
              ".txt": "text", ".text": "text", ".md": "text", ".arrow": "arrow"}
_SCAN = 16 << 20  # bytes read at a time when cutting a large file at newlines
_COMPRESSED_RATIO = 4  # text shrinks ~3-5x: a compressed file of unknown size counts 4x


class DataError(ValueError):
    """A bad input record or file; the message names it and the fix."""


def _compression(path: str) -> Optional[str]:
    return COMPRESSIONS.get(Path(path).suffix.lower())


def _kind(path: str, declared: str) -> Optional[str]:
    if declared == "hf_dataset":
        return "arrow"
    if declared != "auto":
        return declared
    name = path[: -len(Path(path).suffix)] if _compression(path) else path
    return EXTENSIONS.get(Path(name).suffix.lower())


def _hf_dataset_files(directory: Path) -> List[str]:
    """The Arrow files of a `datasets.save_to_disk` directory, in order (state.json)."""
    state = json.loads((directory / "state.json").read_text())
    return [str(directory / f["filename"]) for f in state["_data_files"]]


def list_files(src: SourceConfig) -> Tuple[List[Tuple[str, str]], List[str]]:
    """[(path, kind)] of a source in a stable order, and the problems found."""
    files: List[Tuple[str, str]] = []
    problems: List[str] = []
    for pattern in src.paths:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else (
            [pattern] if os.path.exists(pattern) else [])
        if not matches:
            problems.append(f"source {src.name}: nothing matches {pattern!r}")
        for match in matches:
            path = Path(match)
            if path.is_dir() and (path / "state.json").is_file():
                files += [(f, "arrow") for f in _hf_dataset_files(path)]
                continue
            candidates = sorted(str(p) for p in path.rglob("*") if p.is_file()) if path.is_dir() \
                else [str(path)]
            for candidate in candidates:
                kind = _kind(candidate, src.format)
                if kind is None:
                    problems.append(f"source {src.name}: cannot tell the format of {candidate}; "
                                    f"set sources[].format (jsonl, parquet, text, hf_dataset)")
                else:
                    files.append((candidate, kind))
    return files, problems


def _text_size(path: str, size: int) -> int:
    """Bytes of text in a file: its size, or for a compressed file the uncompressed size its
    trailer (gzip ISIZE) or frame header (zstd) records when that is plausible, else 4x its
    size. Only shard packing and scheduling use it."""
    compression = _compression(path)
    if compression is None or size < 18:
        return size
    with open(path, "rb") as f:
        if compression == "gzip":  # the last member's size mod 2**32: trusted below 1 GB
            f.seek(size - 4)
            recorded = int.from_bytes(f.read(4), "little") if size < 1 << 30 else -1
        else:
            import zstandard

            try:  # the first frame's size, -1 when not recorded
                recorded = zstandard.frame_content_size(f.read(18))
            except zstandard.ZstdError:
                recorded = -1
    return recorded if recorded >= size else size * _COMPRESSED_RATIO


def _cut_points(path: str, size: int, piece_bytes: int) -> List[Tuple[int, int]]:
    """[(byte offset, line number)] where pieces of about `piece_bytes` start (newline-aligned),
    from one sequential pass over the file."""
    points = [(0, 1)]
    target, line, pos = piece_bytes, 1, 0
    with open(path, "rb") as f:
        while target < size:
            chunk = f.read(_SCAN)
            if not chunk:
                break
            while target < pos + len(chunk):
                nl = chunk.find(b"\n", max(target - pos, 0))
                if nl < 0:
                    target = pos + len(chunk)  # continue in the next chunk
                    break
                points.append((pos + nl + 1, line + chunk.count(b"\n", 0, nl + 1)))
                target = pos + nl + 1 + piece_bytes
            line += chunk.count(b"\n")
            pos += len(chunk)
    return [p for p in points if p[0] < size]


def _parquet_pieces(path: str, piece_bytes: int) -> List[dict]:
    """Row-group ranges of about `piece_bytes` uncompressed (Parquet metadata sizes)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    pieces: List[dict] = []
    row = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        if not pieces or (pieces[-1]["size"]
                          and pieces[-1]["size"] + group.total_byte_size > piece_bytes):
            pieces.append({"path": path, "kind": "parquet", "groups": [g, g], "line": row + 1,
                           "size": 0, "start": 0, "end": 0})
        pieces[-1]["groups"][1] = g + 1
        pieces[-1]["size"] += group.total_byte_size
        row += group.num_rows
    return pieces or [{"path": path, "kind": "parquet", "groups": [0, 0], "line": 1, "size": 0,
                       "start": 0, "end": 0}]


def plan_shards(files: List[Tuple[str, str]], shard_size_mb: float) -> List[List[dict]]:
    """Pieces packed into shards in file order (see module docstring)."""
    shard_bytes = max(int(shard_size_mb * (1 << 20)), 1)
    pieces: List[dict] = []
    for path, kind in files:
        size = os.path.getsize(path)
        if kind == "jsonl" and not _compression(path) and size > shard_bytes:
            points = _cut_points(path, size, shard_bytes)
            ends = [p[0] for p in points[1:]] + [size]
            pieces += [{"path": path, "kind": kind, "start": start, "end": end, "line": line,
                        "size": end - start} for (start, line), end in zip(points, ends)]
        elif kind == "parquet" and size:
            pieces += _parquet_pieces(path, shard_bytes)
        else:
            pieces.append({"path": path, "kind": kind, "start": 0, "end": size, "line": 1,
                           "size": _text_size(path, size)})
    shards: List[List[dict]] = []
    filled = 0
    for piece in pieces:  # a new shard when this piece would overfill a non-empty one
        if not shards or (shards[-1] and filled + piece["size"] > shard_bytes):
            shards.append([])
            filled = 0
        shards[-1].append(piece)
        filled += piece["size"]
    return shards


def file_identity(files: List[Tuple[str, str]]) -> List[list]:
    """What the inputs' fingerprint is made of: path, size, modification time."""
    return [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p, _ in files]


class Reader:
    """Documents of one shard; `errors` counts skipped records by kind."""

    def __init__(self, text_field: str, on_error: str):
        self.text_field = text_field
        self.on_error = on_error
        self.errors: Counter = Counter()
        self.empty_documents = 0

    def problem(self, kind: str, where: str, detail: str) -> None:
        if self.on_error != "skip":
            raise DataError(f"{where}: {detail} (set on_error=skip to skip and count such "
                            f"records, or fix the input)")
        self.errors[kind] += 1

    def shard(self, pieces: List[dict]) -> Iterator[Tuple[str, str]]:
        for piece in pieces:
            read = {"jsonl": self._jsonl, "text": self._text, "parquet": self._parquet,
                    "arrow": self._arrow}[piece["kind"]]
            yield from read(piece)

    def _keep(self, text: str) -> bool:
        if text:
            return True
        self.empty_documents += 1
        return False

    def _open(self, path: str) -> io.BufferedIOBase:
        compression = _compression(path)
        if compression == "gzip":
            return gzip.open(path, "rb")
        if compression == "zstd":
            import zstandard

            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
        return open(path, "rb")

    def _jsonl(self, piece: dict) -> Iterator[Tuple[str, str]]:
        path, field = piece["path"], self.text_field
        whole = piece["start"] == 0 and piece["end"] == os.path.getsize(path)
        line_no, seen, remaining = piece["line"] - 1, 0, piece["end"] - piece["start"]
        with self._open(path) as f:
            if not whole:
                f.seek(piece["start"])
            for line in f:
                line_no += 1
                seen += 1
                if not whole:
                    remaining -= len(line)
                if line.strip():
                    try:
                        record = orjson.loads(line)
                    except orjson.JSONDecodeError as error:
                        self._bad_line(line, f"{path}:{line_no}", error)
                    else:
                        text = record.get(field) if isinstance(record, dict) else None
                        if isinstance(text, str):
                            if self._keep(text):
                                yield text, f"{path}:{line_no}"
                        else:
                            self.problem("missing_text", f"{path}:{line_no}",
                                         f"no string field {field!r} (set sources[].text_field)")
                if not whole and remaining <= 0:
                    break
        if whole and seen == 0:
            self.problem("empty_file", path, "the file is empty")

    def _bad_line(self, line: bytes, where: str, error: Exception) -> None:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as bad:
            self.problem("invalid_utf8", where, f"bytes that are not UTF-8 at column "
                         f"{bad.start + 1}")
            return
        self.problem("invalid_json", where, f"not valid JSON ({error})")

    def _text(self, piece: dict) -> Iterator[Tuple[str, str]]:
        path = piece["path"]
        with self._open(path) as f:
            data = f.read()
        if not data:
            self.problem("empty_file", path, "the file is empty")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as bad:
            line = data.count(b"\n", 0, bad.start) + 1
            self.problem("invalid_utf8", f"{path}:{line}", "bytes that are not UTF-8")
            return
        if self._keep(text):
            yield text, path

    def _columns(self, path: str, names: List[str]) -> bool:
        if self.text_field in names:
            return True
        self.problem("missing_text", path, f"no column {self.text_field!r} (columns: "
                     f"{', '.join(names)}; set sources[].text_field)")
        return False

    def _rows(self, path: str, batches, start_row: int = 0) -> Iterator[Tuple[str, str]]:
        row = start_row
        for batch in batches:
            for text in batch.column(self.text_field).to_pylist():
                row += 1
                if isinstance(text, bytes):
                    try:
                        text = text.decode("utf-8")
                    except UnicodeDecodeError:
                        self.problem("invalid_utf8", f"{path} row {row}", "bytes not UTF-8")
                        continue
                if not isinstance(text, str):
                    self.problem("missing_text", f"{path} row {row}", "the text is null")
                elif self._keep(text):
                    yield text, f"{path} row {row}"
        if row == 0:
            self.problem("empty_file", path, "no rows")

    def _parquet(self, piece: dict) -> Iterator[Tuple[str, str]]:
        import pyarrow.parquet as pq

        path = piece["path"]
        if os.path.getsize(path) == 0:
            self.problem("empty_file", path, "the file is empty")
            return
        parquet = pq.ParquetFile(path)
        if self._columns(path, parquet.schema_arrow.names):
            groups = list(range(*piece["groups"]))
            batches = parquet.iter_batches(columns=[self.text_field], batch_size=1024,
                                           row_groups=groups) if groups else iter(())
            yield from self._rows(path, batches, piece["line"] - 1)

    def _arrow(self, piece: dict) -> Iterator[Tuple[str, str]]:
        import pyarrow as pa

        path = piece["path"]
        with pa.memory_map(path) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            if self._columns(path, reader.schema.names):
                yield from self._rows(path, batches)

