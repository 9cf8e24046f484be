"""Data preparation: curation, determinism, resume, bad input, formats, tokenizers, inspect."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from danube.config import ConfigError
from danube.config.compose import DATA_CONFIG_DIR
from danube.prepare.config import compose_prepare_config, validate_prepare
from danube.prepare.pipeline import run_prepare
from danube.prepare.sources import DataError, Reader, list_files, plan_shards
from tests.conftest import QUIET, ROOT, SMALL_MODEL, read_metrics, run_pretrain

PREPARE = ROOT / "launchers" / "prepare_data.py"
WORDS = ("the of and to that have with be river model garden engine castle window science "
         "music forest bridge market letter silver mountain doctor village ocean history "
         "winter teacher planet station harbor library capital lantern meadow").split()


def prose(seed: int, words: int = 120) -> str:
    """English-like text that passes the Gopher rules; distinct seeds share no 5-grams."""
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < words:
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14)))
                         .capitalize() + ".")
    return " ".join(sentences)


GERMAN = ("der die das und ist nicht mit auf für ein eine zu von den dem sich auch wir sie "
          "haben werden Haus Wasser Stadt Garten Brücke Fenster Straße Wald Himmel").split()


def german(seed: int, words: int = 100) -> str:
    """German-like text: what the language-ID fixture model (tests/fixtures) labels de."""
    rng = random.Random(seed)
    return " ".join(rng.choice(GERMAN) for _ in range(words)).capitalize() + "."


def write_jsonl(path: Path, records, compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def config(out: Path, sources: list, *overrides: str):
    cfg = compose_prepare_config("web_code_demo", [f"output_dir={out}", *overrides])
    from danube.prepare.config import SourceConfig

    cfg.sources = [SourceConfig(**s) for s in sources]
    cfg.tokenizer.vocab_size = 400
    cfg.tokenizer.train_sample_mb = 1
    cfg.num_workers = 1
    return cfg


def documents(prefix: Path):
    """Decoded documents of a prepared prefix, read with megatron-core's IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from danube.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(prefix.parent / "tokenizer")
    dataset = IndexedDataset(str(prefix))
    return [tokenizer.detokenize(dataset[i][:-1]) for i in range(len(dataset))]


def outputs(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.suffix in (".bin", ".idx")} | {"tokenizer.json": (out / "tokenizer" /
                                                                 "tokenizer.json").read_bytes()}


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """One curation run over a fixture with a known fate for every document."""
    root = tmp_path_factory.mktemp("curate")
    a, b = prose(1), prose(2)
    near = a.split(" ")
    near[10], near[60] = "lighthouse", "orchard"  # two words changed: a near duplicate
    docs = {"a": a, "b": b, "near_a": " ".join(near), "exact_b": b, "c": prose(3),
            "short": "Too short to keep.", "repeated": "\n".join([prose(7, 12)] * 10)}
    write_jsonl(root / "raw" / "web.jsonl", [{"text": t, "id": k} for k, t in docs.items()])
    cfg = config(root / "out", [dict(name="web", paths=[str(root / "raw")], filters=[
        "gopher_quality", "gopher_repetition"], dedup=["exact", "minhash"])])
    cfg.filters.gopher_quality.max_non_alpha_words_ratio = 0.8
    report = run_prepare(cfg)
    return root / "out", report["sources"]["web"], docs


def test_filters_and_dedup_remove_exactly_the_bad_documents(curated):
    out, report, docs = curated
    assert documents(out / "web_text_document") == [docs["a"], docs["b"], docs["c"]]
    assert report["documents_in"] == 7 and report["documents_out"] == 3
    assert report["removed"] == {"gopher_quality": 1, "gopher_repetition": 1}
    assert report["duplicates"] == {"exact_dedup": 1, "minhash_dedup": 1}
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(out / "web_text_document"))  # its arrays view its mmap
    assert report["tokens_out"] == int(dataset.sequence_lengths.sum())


def test_inspect_shows_removed_and_kept_documents(curated):
    out, _, docs = curated
    from danube.prepare.inspect import inspect

    near = inspect(out, "web", "removed", n=5, step="minhash_dedup")
    assert docs["near_a"][:100] in near and "1 sample(s)" in near
    removed = inspect(out, "web", "removed", n=10)
    assert "gopher_short_doc" in removed and "exact_dedup" in removed
    kept = inspect(out, "web", "kept", n=10, chars=10**6)
    assert all(docs[k] in kept for k in "abc") and docs["short"] not in kept
    result = subprocess.run([sys.executable, str(ROOT / "launchers" / "inspect_data.py"),
                             str(out), "--source", "web", "--stage", "removed", "--step",
                             "gopher_repetition"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and prose(7, 12)[:50] in result.stdout


def test_rerun_is_a_noop_and_a_changed_config_is_refused(curated, capsys):
    out, _, _ = curated
    before = {p: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    cfg = config(out, [dict(name="web", paths=[str(out.parent / "raw")], filters=[
        "gopher_quality", "gopher_repetition"], dedup=["exact", "minhash"])])
    cfg.filters.gopher_quality.max_non_alpha_words_ratio = 0.8
    run_prepare(cfg)
    assert "up to date" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p.suffix != ".json"
               and p.suffix != ".yaml")
    cfg.sources[0].dedup = ["exact"]
    with pytest.raises(ConfigError, match="different config"):
        run_prepare(cfg)


def _many_shards(root: Path, n_docs: int = 400) -> Path:
    write_jsonl(root / "raw" / "a.jsonl", [{"text": prose(i, 60)} for i in range(n_docs)])
    write_jsonl(root / "raw" / "b.jsonl.gz", [{"text": prose(10**4 + i, 40)}
                                              for i in range(n_docs // 4)], compress=True)
    return root / "raw"


def test_parallel_output_equals_single_process_byte_for_byte(tmp_path):
    raw = _many_shards(tmp_path)
    results = {}
    for workers in (1, 2):
        cfg = config(tmp_path / f"out{workers}", [dict(name="web", paths=[str(raw)],
                                                       dedup=["exact"])],
                     "tokenization.shard_size_mb=0.01")
        cfg.num_workers = workers
        run_prepare(cfg)
        results[workers] = outputs(tmp_path / f"out{workers}")
    assert len(list((tmp_path / "out2" / "work" / "web").glob("*/done/filter-*"))) > 4
    assert results[1] == results[2]


@pytest.mark.parametrize("vocab_size", [32000, 70000])  # uint16 and int32 tokens
def test_merged_prefix_equals_megatron_builder_byte_for_byte(tmp_path, vocab_size):
    """build_prefix writes the .bin/.idx from the shards' arrays; megatron-core's
    IndexedDatasetBuilder, fed the same documents one add_document at a time, writes the
    same bytes (empty shards included). A shard whose tokens and lengths disagree is named."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from danube.prepare.tokenize import build_prefix, token_dtype

    dtype, rng = token_dtype(vocab_size), np.random.default_rng(0)
    shards, documents = [], []
    for i, count in enumerate([5, 0, 17]):
        lengths = rng.integers(1, 40, size=count)
        tokens = rng.integers(0, vocab_size, size=int(lengths.sum())).astype(dtype)
        shard = tmp_path / f"shard{i}"
        tokens.tofile(f"{shard}.tokens")
        np.save(f"{shard}.lengths.npy", lengths.astype(np.int64))
        shards.append(shard)
        documents += np.split(tokens, np.cumsum(lengths)[:-1]) if count else []
    build_prefix(shards, tmp_path / "merged", vocab_size)
    builder = IndexedDatasetBuilder(str(tmp_path / "reference.bin"), dtype=dtype)
    for doc in documents:
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(tmp_path / "reference.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"merged{suffix}").read_bytes() == \
            (tmp_path / f"reference{suffix}").read_bytes()
    with open(f"{shards[2]}.tokens", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="shard2.tokens has 10 bytes"):
        build_prefix(shards, tmp_path / "merged", vocab_size)
    assert (tmp_path / "merged.idx").read_bytes() == (tmp_path / "reference.idx").read_bytes()


def _launch(out: Path, raw: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(PREPARE), f"output_dir={out}",
           f"sources=[{{name: web, paths: [{raw}]}}]", "num_workers=1",
           "tokenization.shard_size_mb=0.002", "tokenizer.vocab_size=400",
           "tokenizer.train_sample_mb=1", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def test_resume_after_kill_gives_the_files_of_an_uninterrupted_run(tmp_path):
    raw = _many_shards(tmp_path, 600)
    straight = _launch(tmp_path / "straight", raw)
    assert straight.wait(300) == 0, straight.stderr.read()
    killed = _launch(tmp_path / "killed", raw)
    deadline = time.time() + 300
    while not list((tmp_path / "killed" / "work").glob("web/*/tokens-*/*.done.json")):
        assert killed.poll() is None and time.time() < deadline, killed.stderr.read()
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "web_text_document.bin").exists()
    resumed = _launch(tmp_path / "killed", raw)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "already done" in stdout
    assert outputs(tmp_path / "killed") == outputs(tmp_path / "straight")


BAD_INPUTS = {
    "invalid_json": (b'{"text": "fine"}\n{"text": "broken\n', "bad.jsonl:2"),
    "missing_text": (b'{"text": "fine"}\n{"body": "no text field"}\n', "bad.jsonl:2"),
    "invalid_utf8": (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "bad.jsonl:2"),
    "empty_file": (b"", "bad.jsonl"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_raises_naming_file_and_line_or_is_skipped_and_counted(tmp_path, kind):
    data, where = BAD_INPUTS[kind]
    write_jsonl(tmp_path / "raw" / "good.jsonl", [{"text": prose(i)} for i in range(5)])
    (tmp_path / "raw" / "bad.jsonl").write_bytes(data)
    src = [dict(name="web", paths=[str(tmp_path / "raw")])]
    with pytest.raises(DataError, match=f"{where}.*on_error=skip"):
        run_prepare(config(tmp_path / "out", src))
    report = run_prepare(config(tmp_path / "out2", src, "on_error=skip"))["sources"]["web"]
    assert report["read_errors_skipped"] == {kind: 1}
    assert report["documents_out"] == 5 + (1 if kind != "empty_file" else 0)


def test_bad_input_never_loses_what_was_written(tmp_path):
    write_jsonl(tmp_path / "raw" / "good.jsonl", [{"text": prose(i)} for i in range(5)])
    src = [dict(name="web", paths=[str(tmp_path / "raw")])]
    run_prepare(config(tmp_path / "out", src))
    before = outputs(tmp_path / "out")
    (tmp_path / "raw" / "later.jsonl").write_bytes(b'{"text": oops}\n')
    with pytest.raises(ConfigError, match="different config or different inputs"):
        run_prepare(config(tmp_path / "out", src))  # refused before reading anything
    with pytest.raises(DataError, match="later.jsonl:1"):
        run_prepare(config(tmp_path / "out", src, "overwrite=true"))
    assert outputs(tmp_path / "out") == before


def test_every_input_format_reads_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset

    texts = [prose(i, 20) for i in range(6)]
    write_jsonl(tmp_path / "jsonl" / "part.jsonl.gz", [{"body": t} for t in texts],
                compress=True)
    (tmp_path / "zst").mkdir()
    (tmp_path / "zst" / "part.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"body": t}) + "\n" for t in texts).encode()))
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.table({"body": texts}), tmp_path / "parquet" / "p.parquet",
                   row_group_size=2)
    (tmp_path / "text").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "text" / f"{i}.txt").write_text(t)
    Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "hf"))
    from danube.prepare.config import SourceConfig

    for paths, fmt in [([f"{tmp_path}/jsonl/*.jsonl.gz"], "auto"), ([str(tmp_path / "zst")],
                       "auto"), ([str(tmp_path / "parquet")], "auto"),
                       ([str(tmp_path / "text")], "auto"), ([str(tmp_path / "hf")], "hf_dataset")]:
        src = SourceConfig(name="s", paths=paths, format=fmt, text_field="body")
        files, problems = list_files(src)
        assert not problems
        reader = Reader("body", "raise")
        read = [t for shard in plan_shards(files, 0.0001) for t, _ in reader.shard(shard)]
        assert read == texts, paths


def test_large_jsonl_is_cut_at_lines_with_right_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": f"doc {i}"} for i in range(1000)])
    shards = plan_shards([(str(path), "jsonl")], 0.001)
    assert len(shards) > 10
    reader = Reader("text", "raise")
    read = [(t, ref) for shard in shards for t, ref in reader.shard(shard)]
    assert [t for t, _ in read] == [f"doc {i}" for i in range(1000)]
    assert [ref for _, ref in read] == [f"{path}:{i + 1}" for i in range(1000)]


def test_shards_are_packed_to_their_text_size_and_costliest_run_first(tmp_path):
    """Shards hold up to shard_size_mb of text (a compressed file by the size its header
    records), never more unless one piece is bigger; the Runner starts the costliest first."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from danube.prepare.runner import Runner
    from danube.prepare.sources import _parquet_pieces, _text_size

    mb = 1 << 20
    lines = [json.dumps({"text": "x" * 1000})] * 600  # ~0.6 MB
    plain = [write_jsonl(tmp_path / f"p{i}.jsonl", [json.loads(x) for x in lines])
             for i in range(3)]
    files = [(str(p), "jsonl") for p in plain]
    assert [len(s) for s in plan_shards(files, 1.0)] == [1, 1, 1]  # 0.6 + 0.6 > 1
    assert [len(s) for s in plan_shards(files, 1.3)] == [2, 1]
    gz = write_jsonl(tmp_path / "g.jsonl.gz", [json.loads(x) for x in lines], compress=True)
    assert _text_size(str(gz), gz.stat().st_size) == plain[0].stat().st_size
    data = plain[0].read_bytes()
    (tmp_path / "sized.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    with zstandard.ZstdCompressor().stream_writer(open(tmp_path / "unsized.jsonl.zst", "wb")) \
            as writer:
        writer.write(data)
    for name, expected in [("sized", len(data)), ("unsized", None)]:
        path = tmp_path / f"{name}.jsonl.zst"
        size = path.stat().st_size
        assert _text_size(str(path), size) == (expected or 4 * size)
    rng = random.Random(0)
    table = pa.table({"text": ["".join(rng.choices(WORDS, k=150)) for _ in range(2000)]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=200)  # ~0.2 MB groups
    pieces = _parquet_pieces(str(tmp_path / "t.parquet"), int(0.5 * mb))
    assert [p["groups"] for p in pieces] == [[0, 3], [3, 6], [6, 9], [9, 10]]
    assert max(p["size"] for p in pieces) <= 0.5 * mb

    runner = Runner(2)
    try:
        runner.stage("t", _stamp, [{"dir": str(tmp_path), "i": i} for i in range(3)],
                     [tmp_path / f"done-{i}.json" for i in range(3)], costs=[1, 5, 3])
    finally:
        runner.close()
    started = {i: float((tmp_path / f"started-{i}").read_text()) for i in range(3)}
    assert started[0] > max(started[1], started[2])  # the cheapest waits for a free worker


def _stamp(task: dict) -> dict:
    Path(task["dir"], f"started-{task['i']}").write_text(repr(time.time()))
    time.sleep(0.5)
    return {}


def test_trained_tokenizer_has_specials_digits_and_byte_fallback(tmp_path):
    from danube.data.tokenizer import load_tokenizer

    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": prose(i)} for i in range(20)])
    run_prepare(config(tmp_path / "out", [dict(name="web", paths=[str(tmp_path / "raw")])]))
    tokenizer = load_tokenizer(tmp_path / "out" / "tokenizer")
    assert tokenizer.vocab_size == 400
    for token in ["<s>", "</s>", "<pad>", "<|prompt|>", "<|answer|>", "<|system|>"]:
        assert tokenizer.hf.token_to_id(token) is not None
    assert len(tokenizer.tokenize("2024")) == 4
    unseen = "日本語 ✓ ünïcode"
    assert tokenizer.detokenize(tokenizer.tokenize(unseen)) == unseen
    config_json = json.loads((tmp_path / "out" / "tokenizer" / "tokenizer_config.json")
                             .read_text())
    assert config_json["eos_token"] == "</s>" and "chat_template" in config_json


def test_sentencepiece_model_converts_to_the_same_ids(tmp_path):
    import sentencepiece as spm

    from danube.data.tokenizer import load_tokenizer

    corpus = tmp_path / "spm.txt"
    corpus.write_text("\n".join(prose(i, 30) + " 12345 café" for i in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "llama"), vocab_size=350,
        model_type="bpe", byte_fallback=True, split_digits=True, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False)
    reference = spm.SentencePieceProcessor(model_file=str(tmp_path / "llama.model"))
    tokenizer = load_tokenizer(tmp_path / "llama.model")
    for text in [prose(999, 40), "  two  spaces\nand a newline", "digits 9876 and ünï ✓ 日本"]:
        assert tokenizer.tokenize(text) == reference.encode(text)
        assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
    assert (tokenizer.bos, tokenizer.eod) == (1, 2)


def test_language_id_with_a_model_file_keeps_the_configured_languages(tmp_path):
    """tests/fixtures/lid_en_de.bin (make_lid_model.py) knows en and de; keeping en removes
    exactly the German documents, and the report and `inspect` say so."""
    english = [prose(1000 + i) for i in range(6)]
    deutsch = [german(1000 + i) for i in range(4)]
    mixed = [english[0], deutsch[0], english[1], english[2], deutsch[1], english[3],
             deutsch[2], english[4], deutsch[3], english[5]]
    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": t} for t in mixed])
    cfg = config(tmp_path / "out", [dict(name="web", paths=[str(tmp_path / "raw")],
                                         filters=["language_id"])])
    cfg.filters.language_id.model_path = str(ROOT / "tests" / "fixtures" / "lid_en_de.bin")
    report = run_prepare(cfg)["sources"]["web"]
    assert report["documents_in"] == 10 and report["documents_out"] == 6
    assert report["removed"] == {"language_id": 4}, report
    from danube.prepare.inspect import stage_documents

    kept = [text for text, _ in stage_documents(tmp_path / "out", "web", "curated")]
    removed = list(stage_documents(tmp_path / "out", "web", "removed", "language_id"))
    assert kept == english and [text for text, _ in removed] == deutsch
    assert all("[removed: language_id]" in label for _, label in removed), removed


def test_language_id_without_a_model_file_is_refused_before_any_work(tmp_path):
    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": prose(i)} for i in range(3)])
    src = [dict(name="web", paths=[str(tmp_path / "raw")], filters=["language_id"])]
    cfg = config(tmp_path / "out", src)
    with pytest.raises(ConfigError, match="fastText model file you supply"):
        run_prepare(cfg)
    cfg.filters.language_id.model_path = str(tmp_path / "lid.176.bin")
    with pytest.raises(ConfigError, match="no file at"):
        run_prepare(cfg)
    assert not (tmp_path / "out").exists()


def test_data_configs_compose_and_bad_configs_list_every_problem(tmp_path):
    for path in sorted(DATA_CONFIG_DIR.glob("*.yaml")):
        compose_prepare_config(path.stem)
    cfg = compose_prepare_config("web_code_demo")
    assert not validate_prepare(cfg)
    cfg.sources[1].name = "web"
    cfg.sources[0].filters = ["gopher", "language_id"]
    cfg.sources[0].dedup = ["fuzzy"]
    cfg.on_error = "ignore"
    problems = validate_prepare(cfg)
    assert len(problems) == 5, problems
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("not ours")
    cfg = config(tmp_path / "junk", [dict(name="web", paths=[str(tmp_path / "nothing*")])])
    with pytest.raises(ConfigError, match="nothing matches"):
        run_prepare(cfg)
    (tmp_path / "in.jsonl").write_text('{"text": "x"}\n')
    cfg.sources[0].paths = [str(tmp_path / "in.jsonl")]
    with pytest.raises(ConfigError, match="not a danube data directory"):
        run_prepare(cfg)


def test_prepared_prefixes_train_with_danube_tiny(tmp_path):
    write_jsonl(tmp_path / "raw" / "web.jsonl", [{"text": prose(i, 200)} for i in range(300)])
    write_jsonl(tmp_path / "raw" / "code.jsonl", [{"content": f"def f{i}(x):\n    return x"
                                                   f" * {i}\n"} for i in range(3000)])
    cfg = config(tmp_path / "data", [
        dict(name="web", paths=[str(tmp_path / "raw" / "web.jsonl")], weight=0.7),
        dict(name="code", paths=[str(tmp_path / "raw" / "code.jsonl")], text_field="content",
             weight=0.3)])
    run_prepare(cfg)
    written = (tmp_path / "data" / "pretrain_data.yaml").read_text()
    assert "danube_tiny" in written and "code_text_document" in written
    run_pretrain(["--config-dir", str(tmp_path / "data"), "--config-name", "pretrain_data",
                  *SMALL_MODEL, *QUIET, "trainer.max_steps=4", "model.optim.sched.warmup_steps=1",
                  f"exp_manager.exp_dir={tmp_path / 'exp'}"])
    metrics = [m for m in read_metrics(tmp_path / "exp" / "danube_tiny") if "loss" in m]
    assert len(metrics) == 4 and all(m["loss"] < 7.0 for m in metrics)  # ln(400) = 6.0


def test_bos_follows_the_tokenizer_config_and_is_reported(tmp_path):
    """A Llama/Mistral-style tokenizer (add_bos_token: true in tokenizer_config.json) gets BOS
    before every document by default; add_bos=false turns it off; a tokenizer without a BOS
    token is refused before any work."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from danube.data.tokenizer import train_byte_level_bpe

    texts = [prose(i, 30) for i in range(20)]
    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": t} for t in texts])
    tok_dir = tmp_path / "llama_like"
    tok_dir.mkdir()
    tokenizer = train_byte_level_bpe(texts, 400)
    tokenizer.save(tok_dir / "tokenizer.json")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    source = [dict(name="web", paths=[str(tmp_path / "raw")])]
    for out, extra, first in [("default", [], [tokenizer.bos]),
                              ("off", ["tokenizer.add_bos=false"], [])]:
        cfg = config(tmp_path / out, source, f"tokenizer.path={tok_dir}", *extra)
        report = run_prepare(cfg)
        assert report["tokens"]["add_bos"] is bool(first)
        dataset = IndexedDataset(str(tmp_path / out / "web_text_document"))
        for i, text in enumerate(texts):
            assert dataset[i].tolist() == first + tokenizer.tokenize(text) + [tokenizer.eod]
    (tok_dir / "tokenizer.json").write_text(
        (tok_dir / "tokenizer.json").read_text().replace('"<s>"', '"<x>"'))
    with pytest.raises(ConfigError, match="no beginning-of-sequence token"):
        run_prepare(config(tmp_path / "nobos", source, f"tokenizer.path={tok_dir}"))
    assert not (tmp_path / "nobos").exists()
