"""Data-preparation throughput: documents/s and tokens/s for tokenization to .bin/.idx, and
for the full curation pipeline, on a generated corpus; peak memory of the whole process tree.

    python bench/data_prep.py [--corpus-mb 300] [--curation-mb 20] [--repeat 3]

    python bench/data_prep.py --only merge [--merge-documents 1000000]

Target (issue 13): the final merge of tokenized shards at least 20x faster per 10^6 documents
than the add_document loop it replaced, both run here on the same shards.
Target (issue 3): tokenization with a 32k byte-level BPE on 2 cores >= 1.2M tokens/s end to
end (launcher start to merged prefix), peak memory < 1 GB. The "encoder alone" row is the HF
`tokenizers` encoder on the same corpus already in memory (one process per core, nothing
read or written): the ceiling. Shared machines drift by +-20% from minute to minute, so the
two are run in turns, `--repeat` times each, and the table gives the median and the range;
"of encoder" is the end-to-end rate over the encoder's in the same turn.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from danube.data.tokenizer import load_tokenizer, train_byte_level_bpe  # noqa: E402
from danube.prepare.config import SourceConfig  # noqa: E402
from danube.prepare.sources import Reader, list_files, plan_shards  # noqa: E402
from danube.prepare.synthetic import write_corpus  # noqa: E402


def tree_memory_peak(proc: subprocess.Popen, out: dict) -> None:
    """Poll the summed PSS and RSS of a process and its children until it exits. Reading PSS
    (smaps) costs ~8 ms of CPU per torch-sized process, a tenth of 2 cores at this rate: runs
    that are timed are not polled."""
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            info = [p.memory_full_info() for p in procs]
            out["rss"] = max(out.get("rss", 0), sum(i.rss for i in info))
            out["pss"] = max(out.get("pss", 0), sum(i.pss for i in info))
        except psutil.Error:
            pass
        time.sleep(0.05)


def run_prepare(config_dir: Path, name: str, out: Path, memory: bool = False) -> dict:
    """The launcher as a user runs it, from a fresh output directory: its seconds, or with
    `memory` its peak memory (MiB) instead."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    return rerun_prepare(config_dir, name, memory)


def rerun_prepare(config_dir: Path, name: str, memory: bool = False) -> dict:
    cmd = [sys.executable, str(ROOT / "launchers" / "prepare_data.py"), "--config-dir",
           str(config_dir), "--config-name", name]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak: dict = {}
    poller = threading.Thread(target=tree_memory_peak, args=(proc, peak)) if memory else None
    if poller:
        poller.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    if poller:
        poller.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    if memory:
        return {"pss": peak.get("pss", 0) / 2**20, "rss": peak.get("rss", 0) / 2**20}
    return {"seconds": seconds}


def write_config(config_dir: Path, name: str, body: str) -> None:
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / f"{name}.yaml").write_text(
        f"defaults: [danube_prepare_schema, _self_]\nname: {name}\n{body}")


def corpus_texts(raw: Path, mb: float = float("inf")) -> list:
    """Web and code text, in the corpus' proportions (all of it unless `mb` is given): read
    file by file with the pipeline's own reader, so the encoder sees what the workers see."""
    texts = []
    for source, field, share in (("web", "text", 0.7), ("code", "content", 0.3)):
        files, _ = list_files(SourceConfig(name=source, paths=[str(raw / source)],
                                           text_field=field))
        reader, size = Reader(field, "raise"), 0
        for file in files:
            for pieces in plan_shards([file], 1 << 20):  # the whole file
                for text, _ in reader.shard(pieces):
                    texts.append(text)
                    size += len(text)
            if size > share * mb * 2**20:
                break
    return texts


def _encode_part(raw: Path, tok_dir: Path, part: int, parts: int, barrier, results) -> None:
    """One encoder process: every `parts`-th document of the corpus, read into memory first,
    then encoded with one tokenizer thread (as a pipeline worker does)."""
    texts = corpus_texts(raw)[part::parts]
    tokenizer = load_tokenizer(tok_dir)
    barrier.wait()
    started = time.time()
    tokens = sum(len(e.ids) for i in range(0, len(texts), 256)
                 for e in tokenizer.hf.encode_batch_fast(texts[i:i + 256],
                                                         add_special_tokens=False))
    results.put((len(texts), tokens, started, time.time()))


def encode_all(raw: Path, tok_dir: Path, processes: int) -> dict:
    """The encoder alone on the whole corpus in memory: one process per core, one tokenizer
    thread each, as the pipeline's workers run it."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    os.environ["RAYON_NUM_THREADS"] = "1"  # inherited by the spawned processes
    procs = [ctx.Process(target=_encode_part, args=(raw, tok_dir, k, processes, barrier,
                                                    results)) for k in range(processes)]
    for proc in procs:
        proc.start()
    parts = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    del os.environ["RAYON_NUM_THREADS"]
    return {"docs": sum(p[0] for p in parts), "tokens": sum(p[1] for p in parts),
            "seconds": max(p[3] for p in parts) - min(p[2] for p in parts)}


def spread(values: list, fmt: str = "{:.2f}") -> str:
    """median [min-max]"""
    values = sorted(values)
    text = fmt.format(statistics.median(values))
    return text if len(values) == 1 else \
        f"{text} [{fmt.format(values[0])}-{fmt.format(values[-1])}]"


def builder_merge(shards: list, prefix: Path, dtype) -> None:
    """The merge as it was (before issue 13): every document through megatron-core's
    IndexedDatasetBuilder.add_document, one Python call each."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for shard in shards:
        lengths = np.load(f"{shard}.lengths.npy")
        tokens = np.fromfile(f"{shard}.tokens", dtype=dtype)
        ends = np.cumsum(lengths)
        for start, end in zip((ends - lengths).tolist(), ends.tolist()):
            builder.add_document(tokens[start:end], [end - start])
    builder.finalize(f"{prefix}.idx")


def merge_bench(work: Path, documents: int, vocab_size: int, repeat: int) -> None:
    """Data preparation's final merge of tokenized shards into one prefix, the old loop and
    today's array writes side by side on the same shards (8 shards, 1-128 tokens a
    document), in turns; the outputs are compared byte for byte."""
    import numpy as np

    from danube.prepare.tokenize import build_prefix, token_dtype

    dtype, rng = token_dtype(vocab_size), np.random.default_rng(0)
    shard_dir = work / f"merge-{documents}"
    shards = [shard_dir / f"shard{i}" for i in range(8)]
    if not (shard_dir / "done").is_file():
        shard_dir.mkdir(parents=True, exist_ok=True)
        for shard in shards:
            lengths = rng.integers(1, 129, size=documents // len(shards)).astype(np.int64)
            rng.integers(0, vocab_size, size=int(lengths.sum())).astype(dtype).tofile(
                f"{shard}.tokens")
            np.save(f"{shard}.lengths.npy", lengths)
        (shard_dir / "done").write_text("")
    count = sum(len(np.load(f"{s}.lengths.npy")) for s in shards)
    tokens = sum(os.path.getsize(f"{s}.tokens") for s in shards) // np.dtype(dtype).itemsize
    def fresh_start() -> float:
        """Each timed merge starts alike: no output from an earlier turn (freeing a 128 MB
        file it would replace is not the merge's cost) and no dirty pages left by the other
        column's writes (their write-back ran into the next timed call and made either
        column's time swing 4x from turn to turn). Returns the start time."""
        for name in ("old", "new"):
            for suffix in (".bin", ".idx"):
                (shard_dir / f"{name}{suffix}").unlink(missing_ok=True)
        os.sync()
        return time.perf_counter()

    old, new = [], []
    for _ in range(repeat):
        started = fresh_start()
        builder_merge(shards, shard_dir / "old", dtype)
        old.append(time.perf_counter() - started)
        os.rename(shard_dir / "old.bin", shard_dir / "kept-old.bin")
        os.rename(shard_dir / "old.idx", shard_dir / "kept-old.idx")
        started = fresh_start()
        build_prefix(shards, shard_dir / "new", vocab_size)
        new.append(time.perf_counter() - started)
        for suffix in (".bin", ".idx"):
            if (shard_dir / f"kept-old{suffix}").read_bytes() != \
                    (shard_dir / f"new{suffix}").read_bytes():
                raise SystemExit(f"merged {suffix} files differ")
            (shard_dir / f"kept-old{suffix}").unlink()
    per_million = 1e6 / count
    print(f"\nmerge: {count:,} documents, {tokens / 1e6:.0f}M tokens in 8 shards; "
          f"{repeat} turn(s): median [min-max]; outputs identical byte for byte")
    print("| merge | seconds | seconds per 10^6 documents | speed-up |")
    print("|---|---|---|---|")
    print(f"| IndexedDatasetBuilder.add_document loop (before) | {spread(old)} | "
          f"{spread([t * per_million for t in old])} | 1 |")
    print(f"| build_prefix: concatenated .bin, .idx from arrays | {spread(new)} | "
          f"{spread([t * per_million for t in new])} | "
          f"{spread([a / b for a, b in zip(old, new)], '{:.0f}x')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/danube-bench-data")
    parser.add_argument("--corpus-mb", type=float, default=300)
    parser.add_argument("--curation-mb", type=float, default=20)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--merge-documents", type=int, default=1_000_000)
    parser.add_argument("--only", choices=["all", "merge"], default="all")
    args = parser.parse_args()
    work = Path(args.workdir)
    merge_bench(work, args.merge_documents, args.vocab_size, args.repeat)
    if args.only == "merge":
        return
    raw, small = work / f"raw-{args.corpus_mb:g}mb", work / f"raw-{args.curation_mb:g}mb-small"
    if not (raw / "done").is_file():
        write_corpus(raw, args.corpus_mb * 0.7, args.corpus_mb * 0.3, file_mb=16)
        (raw / "done").write_text("")
    if not (small / "done").is_file():
        write_corpus(small, args.curation_mb * 0.7, args.curation_mb * 0.3, seed=1, file_mb=4)
        (small / "done").write_text("")
    tok_dir = raw.with_name(f"{raw.name}-tokenizer-{args.vocab_size}")
    if not (tok_dir / "tokenizer.json").is_file():
        train_byte_level_bpe(corpus_texts(raw, 50), args.vocab_size).save_pretrained(tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    cores = psutil.cpu_count()

    configs = work / "configs"
    sources = (f"sources:\n  - {{name: web, paths: [{raw}/web], weight: 0.7}}\n"
               f"  - {{name: code, paths: [{raw}/code], text_field: content, weight: 0.3}}\n")
    out = work / "out-tokenize"
    write_config(configs, "tokenize", f"output_dir: {out}\n{sources}"
                 f"tokenizer: {{path: {tok_dir}}}\n")
    encoder, tokenize = [], []
    for turn in range(args.repeat):  # in turns: machine drift hits both alike
        encoder.append(encode_all(raw, tok_dir, cores))
        tokenize.append(run_prepare(configs, "tokenize", out))
        print(f"turn {turn + 1}: encoder {encoder[-1]['tokens'] / encoder[-1]['seconds'] / 1e6:.2f}"
              f"M tokens/s, end to end {tokenize[-1]['seconds']:.1f} s", flush=True)
    tokenize_memory = run_prepare(configs, "tokenize", out, memory=True)
    tokenize_report = json.loads((out / "report.json").read_text())["sources"]
    rerun = {**rerun_prepare(configs, "tokenize"), **rerun_prepare(configs, "tokenize", True)}

    out_full = work / "out-curate"
    write_config(configs, "curate", f"output_dir: {out_full}\n" + (
        f"sources:\n  - {{name: web, paths: [{small}/web], weight: 0.7, filters: "
        "[gopher_quality, gopher_repetition], dedup: [exact, minhash]}\n"
        f"  - {{name: code, paths: [{small}/code], text_field: content, weight: 0.3, "
        "dedup: [exact]}\n") + f"tokenizer: {{path: {tok_dir}}}\n"
        "tokenization: {shard_size_mb: 8}\n")
    curate = {**run_prepare(configs, "curate", out_full),
              **run_prepare(configs, "curate", out_full, memory=True)}
    curate_report = json.loads((out_full / "report.json").read_text())["sources"]

    tok_docs = sum(r["documents_in"] for r in tokenize_report.values())
    tok_tokens = sum(r["tokens_out"] for r in tokenize_report.values())
    cur_docs = sum(r["documents_in"] for r in curate_report.values())
    cur_tokens = sum(r["tokens_out"] for r in curate_report.values())
    enc_rate = [e["tokens"] / e["seconds"] / 1e6 for e in encoder]
    e2e_rate = [tok_tokens / t["seconds"] / 1e6 for t in tokenize]
    print(f"\n{cores} cores, vocab {tokenizer.vocab_size}, {args.corpus_mb:,.0f} MB "
          f"corpus, {tok_tokens / 1e6:.1f}M tokens; {args.repeat} turn(s): median [min-max]; "
          "peak memory from one more run, polled (timed runs are not)")
    print("| stage | docs/s | M tokens/s | of encoder | seconds | peak MiB: PSS (RSS) |")
    print("|---|---|---|---|---|---|")
    print(f"| encoder alone (in memory, {cores} processes) | "
          f"{spread([e['docs'] / e['seconds'] for e in encoder], '{:,.0f}')} | "
          f"{spread(enc_rate)} | 1 | {spread([e['seconds'] for e in encoder], '{:.1f}')} | - |")
    print(f"| tokenize -> .bin/.idx, end to end | "
          f"{spread([tok_docs / t['seconds'] for t in tokenize], '{:,.0f}')} | "
          f"{spread(e2e_rate)} | {spread([a / b for a, b in zip(e2e_rate, enc_rate)])} | "
          f"{spread([t['seconds'] for t in tokenize], '{:.1f}')} | "
          f"{tokenize_memory['pss']:,.0f} ({tokenize_memory['rss']:,.0f}) |")
    print(f"| re-run (no-op) | | | | {rerun['seconds']:.1f} | {rerun['pss']:,.0f} "
          f"({rerun['rss']:,.0f}) |")
    print(f"| curate (Gopher, exact+MinHash) + tokenize, {args.curation_mb:,.0f} MB | "
          f"{cur_docs / curate['seconds']:,.0f} | {cur_tokens / curate['seconds'] / 1e6:.2f} | | "
          f"{curate['seconds']:.1f} | {curate['pss']:,.0f} ({curate['rss']:,.0f}) |")


if __name__ == "__main__":
    main()
