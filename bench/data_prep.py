"""Data-preparation throughput: documents/s and tokens/s for tokenization to .bin/.idx, and
for the full curation pipeline, on a generated corpus; peak memory of the whole process tree.

    python bench/data_prep.py [--corpus-mb 300] [--curation-mb 30] [--vocab-size 32000]

Target (issue 3): tokenization with a 32k byte-level BPE on 2 cores >= 1.2M tokens/s end to
end (launcher start to merged prefix), peak memory < 1 GB. The "encoder alone" row is the HF
`tokenizers` encoder on the same text already in memory (both cores), the ceiling.
"""

import argparse
import gzip
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from danube.data.tokenizer import load_tokenizer, train_byte_level_bpe  # noqa: E402
from danube.prepare.synthetic import write_corpus  # noqa: E402


def tree_rss_peak(proc: subprocess.Popen, out: dict) -> None:
    """Poll the summed RSS of a process and its children until it exits."""
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


def run_prepare(config_dir: Path, name: str) -> dict:
    cmd = [sys.executable, str(ROOT / "launchers" / "prepare_data.py"), "--config-dir",
           str(config_dir), "--config-name", name]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory: dict = {}
    poller = threading.Thread(target=tree_rss_peak, args=(proc, memory))
    poller.start()
    stdout, stderr = proc.communicate()
    poller.join()
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return {"seconds": seconds, "peak": f"{memory.get('pss', 0) / 2**20:,.0f} "
            f"({memory.get('rss', 0) / 2**20:,.0f})"}


def write_config(config_dir: Path, name: str, body: str) -> None:
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / f"{name}.yaml").write_text(
        f"defaults: [danube_prepare_schema, _self_]\nname: {name}\n{body}")


def sample_texts(raw: Path, mb: float) -> list:
    """Web and code text, 7:3, from the start of the corpus."""
    import pyarrow.parquet as pq

    texts, size = [], 0
    for path in sorted((raw / "web").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            for line in f:
                texts.append(json.loads(line)["text"])
                size += len(texts[-1])
                if size > 0.7 * mb * 2**20:
                    break
        if size > 0.7 * mb * 2**20:
            break
    for path in sorted((raw / "code").glob("*.parquet")):
        for text in pq.read_table(path).column("content").to_pylist():
            texts.append(text)
            size += len(text)
            if size > mb * 2**20:
                return texts
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/danube-bench-data")
    parser.add_argument("--corpus-mb", type=float, default=300)
    parser.add_argument("--curation-mb", type=float, default=20)
    parser.add_argument("--vocab-size", type=int, default=32000)
    args = parser.parse_args()
    work = Path(args.workdir)
    raw, small = work / "raw", work / "raw-small"
    if not (raw / "done").is_file():
        write_corpus(raw, args.corpus_mb * 0.7, args.corpus_mb * 0.3, file_mb=16)
        (raw / "done").write_text("")
    if not (small / "done").is_file():
        write_corpus(small, args.curation_mb * 0.7, args.curation_mb * 0.3, seed=1, file_mb=4)
        (small / "done").write_text("")
    tok_dir = work / f"tokenizer-{args.vocab_size}"
    if not (tok_dir / "tokenizer.json").is_file():
        train_byte_level_bpe(sample_texts(raw, 50), args.vocab_size).save_pretrained(tok_dir)
    tokenizer = load_tokenizer(tok_dir)

    texts = sample_texts(raw, 40)
    started = time.perf_counter()
    tokens = sum(len(e.ids) for i in range(0, len(texts), 256)
                 for e in tokenizer.hf.encode_batch_fast(texts[i:i + 256],
                                                         add_special_tokens=False))
    encoder = {"docs": len(texts), "tokens": tokens, "seconds": time.perf_counter() - started}

    configs = work / "configs"
    sources = (f"sources:\n  - {{name: web, paths: [{raw}/web], weight: 0.7}}\n"
               f"  - {{name: code, paths: [{raw}/code], text_field: content, weight: 0.3}}\n")
    out = work / "out-tokenize"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    write_config(configs, "tokenize", f"output_dir: {out}\n{sources}"
                 f"tokenizer: {{path: {tok_dir}}}\n")
    tokenize = run_prepare(configs, "tokenize")
    tokenize_report = json.loads((out / "report.json").read_text())["sources"]
    rerun = run_prepare(configs, "tokenize")

    out_full = work / "out-curate"
    subprocess.run(["rm", "-rf", str(out_full)], check=True)
    write_config(configs, "curate", f"output_dir: {out_full}\n" + (
        f"sources:\n  - {{name: web, paths: [{small}/web], weight: 0.7, filters: "
        "[gopher_quality, gopher_repetition], dedup: [exact, minhash]}\n"
        f"  - {{name: code, paths: [{small}/code], text_field: content, weight: 0.3, "
        "dedup: [exact]}\n") + f"tokenizer: {{path: {tok_dir}}}\n"
        "tokenization: {shard_size_mb: 8}\n")
    curate = run_prepare(configs, "curate")
    curate_report = json.loads((out_full / "report.json").read_text())["sources"]

    def row(label, docs, toks, seconds, mb, peak="-"):
        return (f"| {label} | {mb:,.0f} | {docs / seconds:,.0f} | {toks / seconds / 1e6:.2f} | "
                f"{seconds:.1f} | {peak} |")

    tok_docs = sum(r["documents_in"] for r in tokenize_report.values())
    tok_tokens = sum(r["tokens_out"] for r in tokenize_report.values())
    cur_docs = sum(r["documents_in"] for r in curate_report.values())
    cur_tokens = sum(r["tokens_out"] for r in curate_report.values())
    print(f"{psutil.cpu_count()} cores, vocab {tokenizer.vocab_size}")
    print("| stage | corpus MB | docs/s | M tokens/s | seconds | peak MiB: PSS (RSS) |")
    print("|---|---|---|---|---|---|")
    print(row("encoder alone (in memory, 2 threads)", encoder["docs"], encoder["tokens"],
              encoder["seconds"], 40))
    print(row("tokenize -> .bin/.idx, end to end", tok_docs, tok_tokens, tokenize["seconds"],
              args.corpus_mb, tokenize["peak"]))
    print(f"| re-run (no-op) | | | | {rerun['seconds']:.1f} | {rerun['peak']} |")
    print(row("curate (Gopher, exact+MinHash) + tokenize", cur_docs, cur_tokens,
              curate["seconds"], args.curation_mb, curate["peak"]))


if __name__ == "__main__":
    main()
