"""`model.downstream_eval`: benchmarks on the live model at validation time.

Every rank scores the same fixed subset (the first `limit` documents of each task) through
the same lm-eval model class as eval/evaluate.py, so an in-loop number equals what
`eval/evaluate.py <that step's checkpoint> --limit N` prints (tests/test_training.py). TP
ranks run the forwards together (logits are gathered); data-parallel ranks repeat the work
(a few hundred requests); rank 0 logs. Dropout is off while scoring.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
from typing import Dict

import numpy as np
import torch


@contextlib.contextmanager
def _quiet():
    """lm-eval's progress bars and per-task notices would bury the training log."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def score_live_model(chunks, tokenizer, model_cfg, device, precision: str) -> Dict[str, float]:
    from danube.evaluation.lm import DanubeLM
    from danube.evaluation.run import EvalSettings, headline, score
    from danube.inference.model import from_training

    d = model_cfg.downstream_eval
    settings = EvalSettings(tasks=list(d.tasks), limit=d.limit, num_fewshot=d.num_fewshot,
                            batch_size=d.batch_size)
    im = from_training(chunks, tokenizer, model_cfg, device, precision)
    was_training = im.model.training
    im.model.eval()
    # lm-eval seeds python, numpy and torch: training's random streams must not notice
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        with _quiet(), torch.no_grad():
            results = score(DanubeLM(im, d.batch_size), settings)
    finally:
        im.model.train(was_training)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
    return headline(results)
