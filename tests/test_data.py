"""Pretraining data: the sampler's order, blends, the tokenizer and the embedded corpus."""

from __future__ import annotations

import os

import numpy as np
import pytest

from danube.data.gpt import PretrainingSampler, resolve_blend


def _global_batches(total, consumed, mbs, dp_size):
    """Each global step, the union over DP ranks of their micro-batches, in order."""
    per_rank = [list(PretrainingSampler(total, consumed, mbs, r, dp_size)) for r in range(dp_size)]
    return [sum((per_rank[r][i] for r in range(dp_size)), []) for i in range(len(per_rank[0]))]


def test_sampler_splits_each_global_batch_across_data_parallel_ranks():
    assert list(PretrainingSampler(16, 0, 2, 0, 2)) == [[0, 1], [4, 5], [8, 9], [12, 13]]
    assert list(PretrainingSampler(16, 0, 2, 1, 2)) == [[2, 3], [6, 7], [10, 11], [14, 15]]
    # DP=2 x micro 2 sees the same samples, in the same order, as DP=1 x micro 4.
    assert _global_batches(16, 0, 2, 2) == _global_batches(16, 0, 4, 1)


def test_sampler_resumes_at_consumed_samples():
    full = list(PretrainingSampler(64, 0, 4, 0, 1))
    assert list(PretrainingSampler(64, 24, 4, 0, 1)) == full[6:]
    assert len(PretrainingSampler(64, 24, 4, 0, 1)) == 10


def test_blend_resolution(tmp_path):
    assert resolve_blend(["/d/a"], None) == (["/d/a"], None)
    assert resolve_blend([0.7, "/d/a", 0.3, "/d/b"], None) == (["/d/a", "/d/b"], [0.7, 0.3])
    assert resolve_blend([1, "embedded:code"], tmp_path) == ([str(tmp_path / "code")], [1.0])
    with pytest.raises(ValueError, match="needs the embedded corpus"):
        resolve_blend(["embedded:code"], None)
    with pytest.raises(ValueError, match="even length"):
        resolve_blend([0.7, "/d/a", 0.3], None)


def test_trained_tokenizer_roundtrips_any_text_with_llama_ids():
    from danube.data.tokenizer import train_byte_level_bpe

    corpus = ["def add(a, b):\n    return a + b\n", "The quick brown fox. " * 20] * 20
    tok = train_byte_level_bpe(corpus, vocab_size=400)
    assert (tok.pad, tok.bos, tok.eod) == (0, 1, 2)
    for name in ("<|system|>", "<|prompt|>", "<|answer|>"):
        assert tok.hf.token_to_id(name) is not None
    for text in ("héllo wörld ✓ 12345", "\t\x00 tabs and nul", "日本語"):
        assert tok.detokenize(tok.tokenize(text)) == text  # bytes never fall out
    digits = tok.tokenize("2024")
    assert len(digits) == 4  # digits are split one by one
    other = train_byte_level_bpe(["completely different words here"] * 5, vocab_size=300)
    assert tok.unique_identifiers != other.unique_identifiers


@pytest.fixture(scope="module")
def corpus_dir():
    """The real embedded corpus (cached under $DANUBE_CACHE, built on first use)."""
    from danube.data.embedded import ensure_embedded_corpus

    return ensure_embedded_corpus(8192)


def test_embedded_corpus_is_cached_and_megatron_readable(corpus_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from danube.data.embedded import embedded_tokenizer, ensure_embedded_corpus, manifest

    stamp = os.stat(corpus_dir / "manifest.json").st_mtime_ns
    assert ensure_embedded_corpus(8192) == corpus_dir  # reused, not rebuilt
    assert os.stat(corpus_dir / "manifest.json").st_mtime_ns == stamp
    info = manifest(corpus_dir)
    tok = embedded_tokenizer(corpus_dir)
    assert tok.vocab_size == info["vocab_size"] == 8192
    for source in ("prose", "code"):
        data = IndexedDataset(str(corpus_dir / source))
        assert len(data) == info[source]["documents"] > 100
        assert int(data.sequence_lengths.sum()) == info[source]["tokens"]
        assert data.index.dtype == np.uint16
        first = data[0]
        assert first[-1] == tok.eod and tok.eod not in first[:-1]
    prose_data = IndexedDataset(str(corpus_dir / "prose"))  # keep it alive: [0] views its mmap
    prose = tok.detokenize(prose_data[0][:-1])
    assert prose.strip() and "def " not in prose[:40]  # a docstring, not source


def _plan(samples, epochs, path="/data/web", documents=100, seed=1234):
    return {"samples": samples, "weights": [0.5, 0.5], "seed": seed, "sequence_length": 64,
            "split": [[0.0, 0.98], None, None],
            "sources": [{"path": "/data/prose", "bytes": 10, "documents": 900, "samples": samples,
                         "epochs": 1},
                        {"path": path, "bytes": 20, "documents": documents, "samples": samples,
                         "epochs": epochs}]}


def test_the_data_plan_decides_which_resumes_keep_the_order():
    """Sample counts may change while every source stays within one epoch (megatron-core
    shuffles one epoch the same whatever the count); a source read for several epochs, other
    documents or another seed reorder the data: refused, or accepted with what was rebuilt."""
    from danube.training.data_plan import DataPlanChanged, check_resume, order_kept

    assert order_kept(_plan(64, 1), _plan(128, 1))
    assert order_kept(_plan(64, 3), _plan(64, 3, path="/scratch/web"))  # moved, same contents
    assert not order_kept(_plan(64, 2), _plan(128, 3))
    assert not order_kept(_plan(64, 2), _plan(128, 2))  # same epochs, other final-epoch cut
    assert not order_kept(_plan(64, 1), _plan(64, 1, documents=101))
    assert not order_kept(_plan(64, 1), _plan(64, 1, seed=7))
    assert check_resume(None, _plan(64, 1), False, "ckpt") is None  # saved before plans
    with pytest.raises(DataPlanChanged, match=r"sources\[1\]\.epochs: 2 -> 3.*samples: 64 -> 128"):
        check_resume(_plan(64, 2), _plan(128, 3), False, "ckpt")
    note = check_resume(_plan(64, 2), _plan(128, 3), True, "ckpt")
    assert "rebuilt" in note and "sources[1].epochs: 2 -> 3" in note


def test_a_run_stopped_early_reads_the_data_of_the_whole_run(tmp_path, megatron_world):
    """trainer.max_steps=2 with the schedule's horizon kept (model.optim.sched.max_steps=8)
    builds the index of the 8-step run: the same first batches over a blend with a source
    read for several epochs. Without the horizon the index is sized for 2 steps and that
    source is shuffled over fewer epochs: other batches (what a resume would then continue
    from)."""
    from danube.config.compose import compose_pretrain_config
    from danube.training.pretrain import build_tokenizer, pretraining_recipe
    from tests.conftest import SMALL_MODEL, blend_with_a_small_source

    blend = blend_with_a_small_source(tmp_path)

    def first_batches(name, *overrides):
        cfg = compose_pretrain_config("danube_tiny", [
            *SMALL_MODEL, blend, f"exp_manager.exp_dir={tmp_path}", f"exp_manager.name={name}",
            "trainer.limit_val_batches=0", "trainer.limit_test_batches=0", *overrides])
        tokenizer, corpus = build_tokenizer(cfg)
        steps = pretraining_recipe(cfg, tokenizer, corpus).train_steps(0, 2, 0)
        return [b["tokens"].tolist() for step in steps for b in step.micro_batches]

    whole = first_batches("whole", "trainer.max_steps=8")
    assert first_batches("stopped", "trainer.max_steps=2", "model.optim.sched.max_steps=8") \
        == whole
    assert first_batches("short", "trainer.max_steps=2") != whole


def test_a_ramp_stage_reads_its_own_blend(tmp_path, megatron_world):
    """model.seq_length_stages[i].data_prefix: the stage's batches come from its blend alone
    (every token one of the small source's), the stage without one reads the run's, and the
    data plan records each stage's sources (so a resume that changes one is refused)."""
    from danube.config.compose import compose_pretrain_config
    from danube.training.pretrain import build_tokenizer, pretraining_recipe
    from tests.conftest import SMALL_MODEL, write_indexed

    prefix = tmp_path / "own"
    documents = [[100 + (7 * i + j) % 50 for j in range(9)] for i in range(200)]
    write_indexed(str(prefix), documents)
    own = {t for doc in documents for t in doc}
    cfg = compose_pretrain_config("danube_tiny", [
        *SMALL_MODEL, f"exp_manager.exp_dir={tmp_path}", "trainer.max_steps=-1",
        "trainer.limit_val_batches=0", "trainer.limit_test_batches=0",
        "model.seq_length_stages=[{tokens:1024,encoder_seq_length:32,global_batch_size:16},"
        f"{{tokens:1024,encoder_seq_length:64,global_batch_size:8,data_prefix:[1.0,{prefix}]}}]"])
    tokenizer, corpus = build_tokenizer(cfg)
    recipe = pretraining_recipe(cfg, tokenizer, corpus)
    tokens = {step: {t for b in data.micro_batches for t in b["tokens"].flatten().tolist()}
              for step, data in enumerate(recipe.train_steps(0, 4, 0))}
    assert tokens[2] | tokens[3] <= own  # stage 2: its own blend
    assert not tokens[0] <= own  # stage 1: the run's (embedded) blend
    stages = recipe.data_plan["stages"]
    assert [str(prefix) in str(stage) for stage in stages] == [False, True]


def test_the_index_cache_build_waits_for_another_experiment(tmp_path, megatron_world):
    """Experiments sharing model.data.index_mapping_dir: while another job's rank 0 holds the
    cache's lock (building), this one waits before building, then builds normally."""
    import subprocess
    import sys
    import time

    from danube.config.compose import compose_pretrain_config
    from danube.data.gpt import INDEX_LOCK
    from danube.training.pretrain import build_tokenizer, pretraining_recipe
    from tests.conftest import SMALL_MODEL

    shared = tmp_path / "shared_index"
    cfg = compose_pretrain_config("danube_tiny", [
        *SMALL_MODEL, f"exp_manager.exp_dir={tmp_path}", f"model.data.index_mapping_dir={shared}",
        "trainer.max_steps=2", "trainer.limit_val_batches=0", "trainer.limit_test_batches=0"])
    tokenizer, corpus = build_tokenizer(cfg)
    shared.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fasteners, sys, time\n"
        f"lock = fasteners.InterProcessLock({str(shared / INDEX_LOCK)!r}); lock.acquire()\n"
        "print('held', flush=True); time.sleep(3)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    recipe = pretraining_recipe(cfg, tokenizer, corpus)
    waited = time.monotonic() - start
    holder.wait(timeout=30)
    assert waited > 2, waited  # it could not build while the other held the lock
    assert list(shared.glob("*.npy")) and next(iter(recipe.train_steps(0, 1, 0))).micro_batches
