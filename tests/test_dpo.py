"""Direct preference optimization: each loss against a hand computation, pair tokenization,
the reference policy (bit-identical at step 0, cached, LoRA adapters disabled), and the
launcher end to end (equivalences step by step, fp32)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from danube.config.schema import DPODataConfig
from danube.data.chat import ChatDataError, ChatTemplate
from danube.data.dpo import build_dpo_dataset, dpo_step_batches, encode_pair
from danube.data.tokenizer import load_tokenizer
from danube.training.dpo import preference_loss
from tests.conftest import read_metrics, run_dpo, train_records

LOG2 = math.log(2.0)
LOG2_FP32 = float(torch.tensor(LOG2, dtype=torch.float32))  # what an fp32 run computes exactly


# --- the losses ------------------------------------------------------------------------------

def _sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("kind", ["dpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl", "hinge",
                                  "robust"])
def test_each_loss_is_its_formula(kind):
    beta, eta, eps = 0.2, 0.5, 0.1
    d = [1.5, -0.7, 0.0, 4.0]
    gap = [1.0, 0.0, 2.0, -1.0]
    hand = {
        # label_smoothing eps with dpo: conservative DPO (TRL's cDPO)
        "dpo": lambda d, g: (-(1 - eps) * math.log(_sig(beta * d))
                             - eps * math.log(_sig(-beta * d))),
        "ipo": lambda d, g: (d - 1 / (2 * beta)) ** 2,
        "rpo_sq": lambda d, g: (beta * d - eta * g) ** 2,
        "rpo_bwd_kl": lambda d, g: _kl(_sig(eta * g), _sig(beta * d)),
        "rpo_fwd_kl": lambda d, g: _kl(_sig(beta * d), _sig(eta * g)),
        "hinge": lambda d, g: max(0.0, 1 - beta * d),
        "robust": lambda d, g: (-(1 - eps) * math.log(_sig(beta * d))
                                + eps * math.log(_sig(-beta * d))) / (1 - 2 * eps),
    }[kind]
    ours = preference_loss(kind, torch.tensor(d, dtype=torch.float64), beta,
                           torch.tensor(gap, dtype=torch.float64), eta, eps)
    assert ours.tolist() == pytest.approx([hand(x, g) for x, g in zip(d, gap)], rel=1e-12)


def test_dpo_without_label_smoothing_is_plain_dpo():
    d = torch.tensor([1.5, -0.7, 0.0], dtype=torch.float64)
    plain = preference_loss("dpo", d, 0.2, torch.zeros(3, dtype=torch.float64), 0.5, 0.0)
    assert plain.tolist() == pytest.approx([-math.log(_sig(0.2 * x)) for x in d.tolist()],
                                           rel=1e-12)


def _kl(q, p):
    return q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))


def test_step_zero_values():
    """Policy == reference (d = 0): dpo is log 2, ipo 1/(4 beta^2), rpo_sq eta^2 (g_c-g_r)^2."""
    zero, gap = torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 2.0, 0.5],
                                                                 dtype=torch.float64)
    beta, eta = 0.2, 0.7
    assert preference_loss("dpo", zero, beta, gap, eta, 0).tolist() == [LOG2] * 3
    assert preference_loss("ipo", zero, beta, gap, eta, 0).tolist() == \
        pytest.approx([1 / (4 * beta ** 2)] * 3, rel=1e-15)
    assert preference_loss("rpo_sq", zero, beta, gap, eta, 0).tolist() == \
        pytest.approx((eta ** 2 * gap ** 2).tolist(), rel=1e-15)


# --- pairs -----------------------------------------------------------------------------------

PROMPT = [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": "What does `os.getcwd` do?"}]
GOOD, BAD = "Return a string of the current directory.", "It is in `os`."


def _data(**kw) -> DPODataConfig:
    return DPODataConfig(**{"seq_length": 64, **kw})


def test_every_format_gives_the_same_pair_prompt_a_prefix_and_eos_trained(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    template = ChatTemplate.for_tokenizer(tokenizer)
    rendered = template.render(PROMPT, add_generation_prompt=True)  # ...<|answer|>
    formats = [
        {"prompt": PROMPT, "chosen_response": {"role": "assistant", "content": GOOD},
         "rejected_response": {"role": "assistant", "content": BAD}},  # Aligner, messages
        {"prompt": rendered, "chosen_response": GOOD, "rejected_response": BAD},  # strings
        {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": GOOD}],
         "rejected": [{"role": "assistant", "content": BAD}]},  # TRL conversational
        {"chosen": PROMPT + [{"role": "assistant", "content": GOOD}],
         "rejected": PROMPT + [{"role": "assistant", "content": BAD}]},  # TRL implicit prompt
    ]
    pairs = [encode_pair(r, "x", template, tokenizer, _data()) for r in formats]
    for pair in pairs:
        assert pair.chosen.ids.tolist() == pairs[0].chosen.ids.tolist()
        assert pair.rejected.ids.tolist() == pairs[0].rejected.ids.tolist()
        assert pair.rewards == (1.0, 0.0) and not pair.masked and pair.joint_differs is None
    pair = pairs[0]
    n = pair.prompt_tokens
    assert pair.chosen.ids[:n].tolist() == pair.rejected.ids[:n].tolist()
    assert not pair.chosen.trained[:n].any() and pair.chosen.trained[n:].all()
    assert tokenizer.detokenize(pair.chosen.ids[pair.chosen.trained]) == GOOD + "</s>"
    assert pair.chosen.ids[-1] == tokenizer.eod and pair.rejected.ids[-1] == tokenizer.eod
    # A merge across the prompt/response boundary is counted, and the pair is still trained
    # segment by segment.
    merged = encode_pair({"prompt": "What does os.getc", "chosen_response": "wd do?",
                          "rejected_response": " x"}, "x", template, tokenizer, _data())
    assert merged.joint_differs is not None  # a merge reaching back over the boundary
    long = encode_pair({"prompt": "x " * 80, "chosen_response": "a", "rejected_response": "b",
                        "chosen_reward": 3}, "x", template, tokenizer, _data())
    assert long.masked and long.rewards == (3.0, 0.0)


@pytest.mark.parametrize("line, needle", [
    ('{"prompt": "q", "chosen": "a"}', "missing rejected"),
    ('{"prompt": "q", "good": "a", "bad": "b"}', "needs chosen_response/rejected_response"),
    ('{"prompt": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"}',
     "unknown role 'bot'"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "chosen_reward": "high"}',
     "chosen_reward must be a number"),
    ("[1, 2]", "not a JSON object"),
])
def test_bad_pairs_name_file_and_line(tokenizer_dir, tmp_path, line, needle):
    tokenizer = load_tokenizer(tokenizer_dir)
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + line)
    with pytest.raises(ChatDataError, match=f"p.jsonl:2: .*{needle}"):
        build_dpo_dataset(str(path), _data(), tokenizer)
    skipped = build_dpo_dataset(str(path), _data(on_error="skip"), tokenizer)
    assert skipped.stats["skipped_bad_records"] == 1 and len(skipped.pairs) == 1


def test_packed_rows_keep_pairs_whole_and_masked_pairs_out(tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(tokenizer_dir)
    path = tmp_path / "p.jsonl"
    records = [{"prompt": PROMPT, "chosen": GOOD * (1 + i % 2), "rejected": BAD}
               for i in range(5)] + [{"prompt": "x " * 80, "chosen": "a", "rejected": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = build_dpo_dataset(str(path), _data(), tokenizer)
    step = dpo_step_batches(dataset, list(range(6)), 64, True, 2, 0, 1, 0)
    assert (step.pairs, step.masked) == (6, 1)
    pairs = torch.cat([b["pair_index"] for b in step.micro_batches]).tolist()
    assert sorted(pairs) == [0, 1, 2, 3, 4]  # the masked pair 5 is in no row
    for batch in step.micro_batches:
        gather, mask = batch["seq_gather"], batch["seq_mask"]
        for k in range(gather.shape[0]):  # sequence 2j chosen, 2j+1 rejected of pair j
            pair = dataset.pairs[batch["pair_index"][k // 2]]
            sample = pair.chosen if k % 2 == 0 else pair.rejected
            labels = batch["labels"].reshape(-1)[gather[k, :sample.positions]]
            assert labels.tolist() == sample.ids[1:].tolist()
            assert mask[k].sum() == sample.trained[1:].sum()


# --- the launcher ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """The first 64 embedded pairs: enough for the tests' steps, quick to tokenize and to
    precompute."""
    from danube.data.embedded_chat import resolve_chat_files

    (source,) = resolve_chat_files("embedded:preference", None)
    path = tmp_path_factory.mktemp("pairs") / "train.jsonl"
    path.write_text("".join(Path(source).read_text().splitlines(keepends=True)[:64]))
    return path


def _common(tmp_path, init_checkpoint, pairs_file):
    return [f"model.restore_from_path={init_checkpoint}", "model.encoder_seq_length=64",
            f"model.data.data_prefix.train={pairs_file}",
            "model.global_batch_size=8", "model.micro_batch_size=4", "trainer.max_epochs=null",
            "trainer.max_steps=4", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0",
            "trainer.precision=32", "exp_manager.create_tensorboard_logger=false",
            "model.optim.sched.warmup_steps=1", "model.optim.sched.max_steps=10",
            "model.optim.lr=3e-3", f"exp_manager.exp_dir={tmp_path}",
            "model.data.data_prefix.validation=null", f"model.dpo.ref_log_probs_cache_dir="
            f"{tmp_path}/ref_cache",
            "exp_manager.checkpoint_callback_params.every_n_train_steps=2"]


def _packed(value: bool):
    return [f"model.data.packed_sequence={str(value).lower()}"]


def _assert_same(records, reference, rel=1e-5):
    """Step for step: loss and accuracy to `rel`; the margin, a difference of differences of
    log-probs, to 10 x rel. A step where every reference reward is exactly 0 (step 1: the
    policy is the reference) is a tie for every pair: another layout's rewards must be 0 to
    rounding, and its accuracy (chosen reward > rejected, strictly, as NeMo-Aligner and TRL
    count it) is then the sign of that rounding, not compared (on an AVX512-BF16 CPU one of 8
    pairs of the PP=2 run came out 1e-6 ahead)."""
    assert list(records) == list(reference)
    for step, ref in reference.items():
        tie = ref["rewards_all_std"] == 0.0
        if tie:
            assert records[step]["rewards_all_std"] < 1e-4, step
        for key, tol in (("loss", rel), ("acc", rel), ("rewards_margins", 10 * rel)):
            if key == "acc" and tie:
                continue
            assert records[step][key] == pytest.approx(ref[key], rel=tol, abs=1e-6), (step, key)
        assert records[step]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=2e-4), step
        assert records[step]["masked_pairs"] == ref["masked_pairs"]


@pytest.fixture(scope="module")
def dpo_reference_run(tmp_path_factory, init_checkpoint, pairs_file):
    """The unpacked reference run: its experiment (checkpoints at steps 2 and 4), its output."""
    exp = tmp_path_factory.mktemp("dpo_reference")
    result = run_dpo([*_common(exp, init_checkpoint, pairs_file), *_packed(False),
                      "exp_manager.name=unpacked"])
    return exp / "unpacked", result.stdout


@pytest.fixture(scope="module")
def dpo_reference(dpo_reference_run):
    run, stdout = dpo_reference_run
    return train_records(run), stdout


def test_step_zero_is_log2_and_training_moves_the_margin(dpo_reference):
    """The reference is the starting model: at step 1 policy and reference log-probs are the
    same bits, so the loss is exactly log 2 and every reward 0; then the margin grows."""
    records, stdout = dpo_reference
    first = records[1]
    assert first["ref_logps_abs_diff"] == 0.0
    assert first["loss"] == LOG2_FP32
    assert first["rewards_margins"] == 0.0 and first["rewards_all_std"] == 0.0
    assert first["logps_chosen"] < 0 and first["masked_pairs"] >= 0
    assert records[4]["loss"] < first["loss"] and records[4]["rewards_margins"] > 0
    assert "reference adapters disabled" not in stdout and "starting weights" in stdout


def test_packed_equals_unpacked(tmp_path, init_checkpoint, pairs_file, dpo_reference):
    run_dpo([*_common(tmp_path, init_checkpoint, pairs_file), *_packed(True),
             "exp_manager.name=packed"])
    _assert_same(train_records(tmp_path / "packed"), dpo_reference[0])


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory, init_checkpoint, pairs_file):
    """A TP=2 run with ref_log_probs=precompute: its records and its cache directory."""
    exp = tmp_path_factory.mktemp("dpo_precomputed")
    result = run_dpo([*_common(exp, init_checkpoint, pairs_file), *_packed(False),
                      "model.tensor_model_parallel_size=2", "model.dpo.ref_log_probs=precompute",
                      "exp_manager.name=tp2"], nproc=2)
    assert "one pass over" in result.stdout
    return train_records(exp / "tp2"), exp / "ref_cache"


@pytest.mark.parametrize("layout, extra, nproc", [
    ("dp2_packed", _packed(True) + ["model.micro_batch_size=1"], 2),
    ("pp2", ["model.pipeline_model_parallel_size=2", "model.dpo.ref_log_probs=precompute"], 2),
])
def test_layouts_follow_the_single_process_trajectory(tmp_path, init_checkpoint, pairs_file,
                                                      dpo_reference, precomputed, layout, extra,
                                                      nproc):
    """Global per-pair normalization: DP=2 with micro-batch 1 (packed: the ranks hold
    different pair counts, each accumulating over several micro-batches), TP=2 and PP=2
    equal micro-batch 4 on one process. TP=2
    computes the reference log-probs once before training (precompute): the same bits as the
    on-the-fly reference at step 1; PP=2 reuses that cache (another layout: within
    tolerance)."""
    records, cache = precomputed
    assert records[1]["ref_logps_abs_diff"] == 0.0
    _assert_same(records, dpo_reference[0])
    run = run_dpo([*_common(tmp_path, init_checkpoint, pairs_file), *_packed(False), *extra,
                   f"model.dpo.ref_log_probs_cache_dir={cache}", f"exp_manager.name={layout}"],
                  nproc=nproc)
    if layout == "pp2":
        assert "reusing" in run.stdout
    _assert_same(train_records(tmp_path / layout), dpo_reference[0])


def test_resume_equals_uninterrupted(tmp_path, init_checkpoint, pairs_file, dpo_reference_run,
                                     dpo_reference):
    """The reference run's step-2 checkpoint, resumed in another experiment to the end: the
    reference's losses bit for bit."""
    import shutil

    common = [*_common(tmp_path, init_checkpoint, pairs_file), *_packed(False),
              "exp_manager.name=resumed"]
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(dpo_reference_run[0] / "checkpoints" / "step_00000002",
                    tmp_path / "resumed" / "checkpoints" / "step_00000002")
    second = run_dpo(common)
    assert "resumed from" in second.stdout and "(step 2)" in second.stdout
    records = train_records(tmp_path / "resumed")
    assert list(records) == [3, 4]
    for step in records:
        assert records[step]["loss"] == dpo_reference[0][step]["loss"], step


def test_init_validation_is_step_zero_s_and_changes_no_training(tmp_path, init_checkpoint,
                                                               pairs_file, dpo_reference):
    """trainer.run_init_validation: a validation before the first step, logged at step 0,
    where the policy is its reference: the DPO loss of zero rewards, -log sigmoid(0) = ln 2,
    and accuracy 0 (every pair a tie; chosen must win strictly). The training that follows is
    the reference run's bit for bit (validation draws no training data), and a resumed run
    does not validate at step 0 again."""
    import shutil

    common = [*_common(tmp_path, init_checkpoint, pairs_file), *_packed(False),
              f"model.data.data_prefix.validation={pairs_file}", "trainer.limit_val_batches=1",
              "trainer.val_check_interval=4", "trainer.run_init_validation=true"]
    run_dpo([*common, "exp_manager.name=init_val"])
    validations = [r for r in read_metrics(tmp_path / "init_val") if "val_loss" in r]
    assert [r["step"] for r in validations] == [0, 4]
    zero, last = validations
    assert zero["val_preference_loss"] == pytest.approx(LOG2, abs=1e-6)
    assert zero["val_acc"] == 0.0 and zero["val_rewards_margins"] == 0.0
    assert last["val_loss"] < zero["val_loss"] and last["val_acc"] > 0.5
    records = train_records(tmp_path / "init_val")
    for step, ref in dpo_reference[0].items():
        assert records[step]["loss"] == ref["loss"], step
    # the demo's summary shows both ends: where validation started and where it ended
    from danube.training.metrics import summarize

    row = summarize([tmp_path / "init_val"]).splitlines()[1]
    assert f"0.693 -> {last['val_loss']:.3f}" in row and f"0.00 -> {last['val_acc']:.2f}" in row

    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "init_val" / "checkpoints" / "step_00000002",
                    tmp_path / "resumed" / "checkpoints" / "step_00000002")
    run_dpo([*common, "exp_manager.name=resumed"])
    assert [r["step"] for r in read_metrics(tmp_path / "resumed") if "val_loss" in r] == [4]


def test_a_reference_that_is_not_the_model_stops_the_run(tmp_path, init_checkpoint,
                                                         pairs_file, precomputed):
    """The cache keeps per-token values too; one whose values do not belong to the starting
    model stops the run at step 1 with the reason, before anything is saved."""
    (cache,) = precomputed[1].glob("*.pt")
    saved = torch.load(cache, weights_only=False)
    assert len(saved["chosen_tokens"]) == saved["pairs"]
    saved["chosen"] = saved["chosen"] + 1.0
    (tmp_path / "cache").mkdir()
    torch.save(saved, tmp_path / "cache" / cache.name)
    bad = run_dpo([*_common(tmp_path, init_checkpoint, pairs_file), *_packed(False),
                   "model.dpo.ref_log_probs=precompute",
                   f"model.dpo.ref_log_probs_cache_dir={tmp_path}/cache",
                   "exp_manager.name=mismatch"], check=False)
    assert bad.returncode == 2 and "at step 0 the policy's log-probs differ" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "mismatch" / "checkpoints").exists()


LORA = ["model.peft.peft_scheme=lora", "model.peft.lora_tuning.adapter_dim=4",
        "model.peft.lora_tuning.alpha=16",
        "model.peft.lora_tuning.target_modules=[attention_qkv,attention_dense,mlp_fc1,mlp_fc2]"]


def test_lora_reference_is_the_model_with_adapters_disabled(tmp_path, init_checkpoint,
                                                           pairs_file):
    """No second copy of the weights: the reference is the base model (adapters off); at
    step 1 it equals the adapted model bit for bit; the base weights never change."""
    from danube.conversion.mcore_files import DistCheckpointReader

    result = run_dpo([*_common(tmp_path, init_checkpoint, pairs_file), *_packed(True), *LORA,
                      "model.optim.lr=5e-3", "exp_manager.name=lora"])
    assert "reference adapters disabled" in result.stdout
    records = train_records(tmp_path / "lora")
    assert records[1]["loss"] == LOG2_FP32
    assert records[1]["ref_logps_abs_diff"] == 0.0
    assert records[4]["loss"] < records[1]["loss"]
    final = tmp_path / "lora" / "checkpoints" / "step_00000004"
    before, after = DistCheckpointReader(init_checkpoint), DistCheckpointReader(final)
    start, end = before.layer(0), after.layer(0)
    assert all(torch.equal(start[k], end[k]) for k in start)

    # H2O-Danube's second pass starts from the first's checkpoint: its adapters are merged
    # into the base on loading, so the second pass's reference is the first pass's model.
    from danube.conversion.exporter import merge_adapters

    second = run_dpo([*_common(tmp_path, init_checkpoint, pairs_file), *_packed(True), *LORA,
                      f"model.restore_from_path={final}", "trainer.max_steps=1",
                      "model.optim.lr=3e-3", "exp_manager.name=lora2"])
    assert "LoRA adapters merged into the base weights" in second.stdout
    records = train_records(tmp_path / "lora2")
    assert records[1]["loss"] == LOG2_FP32 and records[1]["ref_logps_abs_diff"] == 0.0
    merged = merge_adapters(after.layer(1), after.layer(1, after.adapter_keys()), 16 / 4)
    restarted = DistCheckpointReader(tmp_path / "lora2" / "checkpoints" / "step_00000001")
    assert all(torch.equal(restarted.layer(1)[k], merged[k]) for k in merged)
    full = run_dpo([*_common(tmp_path, init_checkpoint, pairs_file),
                    f"model.restore_from_path={final}",
                    "exp_manager.name=full_from_lora"], check=False)
    assert full.returncode == 2 and "was written by a LoRA run" in full.stderr


def test_dry_run_bad_data_and_bad_config_write_nothing(tmp_path, init_checkpoint, pairs_file):
    result = run_dpo([*_common(tmp_path, init_checkpoint, pairs_file), "--dry-run", "2"])
    out = result.stdout
    assert "prompt" in out and "chosen" in out and "rejected" in out
    assert "'</s>'" in out  # each response ends with its trained end-of-turn token
    assert "summary (train):" in out and "joint tokenization differs" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q"}\n')
    result = run_dpo([*_common(tmp_path, init_checkpoint, pairs_file),
                      f"model.data.data_prefix.train={bad}"], check=False)
    assert result.returncode == 2 and "bad.jsonl:2:" in result.stderr
    result = run_dpo([*_common(tmp_path, init_checkpoint, pairs_file),
                      "model.dpo.preference_loss=kto",
                      "model.hidden_dropout=0.1", "model.data.data_prefix.train=nope.jsonl"],
                     check=False)
    assert result.returncode == 2 and "preference_loss='kto'" in result.stderr
    assert "model.hidden_dropout=0.1" in result.stderr and "nope.jsonl not found" in result.stderr
    assert not (tmp_path / "danube_tiny_dpo").exists()


def test_the_reference_cache_key_changes_with_what_masks_pairs(tokenizer_dir, tmp_path):
    """Pairs longer than seq_length are masked (NaN in the reference cache); a run with a
    longer seq_length, where they are valid, must not read those NaNs: the key covers which
    pairs are masked (and so seq_length), as it covers the ids (templates, tokenizer,
    append_eod)."""
    import dataclasses
    import json

    from danube.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "x " * n, "chosen_response": "a",
                                          "rejected_response": "b"}) for n in (3, 60)) + "\n")
    short = build_dpo_dataset(str(path), dataclasses.replace(_data(), seq_length=32), tokenizer)
    long = build_dpo_dataset(str(path), dataclasses.replace(_data(), seq_length=512), tokenizer)
    assert [p.masked for p in short.pairs] == [False, True]
    assert [p.masked for p in long.pairs] == [False, False]
    assert short.digest() != long.digest()
    again = build_dpo_dataset(str(path), dataclasses.replace(_data(), seq_length=32), tokenizer)
    assert again.digest() == short.digest()


def test_the_step_one_check_is_exact_on_cpu_and_tolerant_of_kernels_on_a_gpu():
    """Policy == reference at step 1: bit-exact on a CPU (the same kernels), within rounding
    on a GPU where the train-mode and no_grad passes may take different kernels (no false
    stop on the first GPU DPO run); a cache from another layout is within rounding anywhere."""
    from danube.training.dpo import LAYOUT_TOLERANCE, first_step_tolerance

    assert first_step_tolerance(True, "32", cuda=False) == 0.0
    assert first_step_tolerance(True, "bf16-mixed", cuda=False) == 0.0
    assert first_step_tolerance(True, "bf16-mixed", cuda=True) == LAYOUT_TOLERANCE["bf16"]
    assert first_step_tolerance(True, "32", cuda=True) == LAYOUT_TOLERANCE["32"]
    assert first_step_tolerance(False, "32", cuda=False) == LAYOUT_TOLERANCE["32"]
