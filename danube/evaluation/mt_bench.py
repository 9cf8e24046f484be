"""MT-Bench answers from a danube checkpoint: FastChat's `model_answer` JSONL, for a judge to
score elsewhere (no judge model here)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Optional

from danube.evaluation.data import mt_bench_questions
from danube.inference.chat import ChatSession
from danube.inference.generate import Sampling
from danube.inference.model import InferenceModel


def mt_bench_answers(im: InferenceModel, sampling: Sampling, output: Path, model_id: str,
                     limit: Optional[int] = None) -> int:
    """Answer MT-Bench's 80 two-turn questions; write FastChat's `model_answer` JSONL
    (llm_judge/data/mt_bench/model_answer/<model_id>.jsonl) for a judge to score elsewhere."""
    questions = mt_bench_questions()[:limit] if limit else mt_bench_questions()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w") as f:
        for question in questions:
            session = ChatSession(im, sampling)
            turns = [session.reply(turn) for turn in question["turns"]]
            f.write(json.dumps({
                "question_id": question["question_id"], "answer_id": uuid.uuid4().hex,
                "model_id": model_id, "choices": [{"index": 0, "turns": turns}],
                "tstamp": time.time()}) + "\n")
    tmp.replace(output)
    return len(questions)
