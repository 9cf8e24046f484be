"""bench/in_context.py's probes tell a model that uses its context from one that does not:
the figures in docs/benchmarks.md ("what the demo's models learn") rest on them."""

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 8192


def probes():
    spec = importlib.util.spec_from_file_location("in_context", ROOT / "bench/in_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scorer(logits):
    """An InferenceModel as score() sees it, its logits computed by `logits(tokens)`."""
    return SimpleNamespace(tokenizer=SimpleNamespace(eod=0), vocab=VOCAB, logits=logits)


def copier(tokens):
    """[b, s] -> [b, s, V]: an induction head by hand. Where the current token occurred
    before, the token that followed it then gets almost all the mass; else uniform."""
    out = torch.zeros(*tokens.shape, VOCAB)
    for b, row in enumerate(tokens.tolist()):
        seen = {}
        for i, token in enumerate(row):
            if token in seen and seen[token] + 1 < len(row):
                out[b, i, row[seen[token] + 1]] = 20.0
            seen[token] = i
    return out


def test_the_copy_probe_tells_a_copier_from_a_model_that_ignores_its_context():
    module = probes()
    first, second = module._copy_nll(scorer(copier))
    assert abs(first - math.log(VOCAB)) < 0.1  # nothing to copy yet: uniform
    assert second / first < 0.05  # the second copy is predicted
    first, second = module._copy_nll(scorer(lambda t: torch.zeros(*t.shape, VOCAB)))
    assert abs(second / first - 1) < 1e-6


def test_on_topic_counts_shared_words_and_not_the_generic_form():
    module = probes()
    questions = ["What does `os.path.join` do?", "What does `shutil.copyfile` do?"]
    references = ["Join two or more pathname components.",
                  "Copy data from src to dst in the most efficient way possible."]
    assert module._on_topic(questions, references, references) == 2
    assert module._on_topic(questions, references, ["Return a string."] * 2) == 0
    # the name alone counts (camelCase and snake_case are split), the reference's words too
    assert module._on_topic(["What does `a.copyFile` do?"], ["Duplicate it."],
                            ["It copies the bytes."]) == 0  # "copie" != "copy" (5 letters)
    assert module._on_topic(["What does `a.copyFile` do?"], ["Duplicate it."],
                            ["Copy it."]) == 1
    assert module._on_topic(["What does `a.b` do?"], ["Duplicate the pathname."],
                            ["Return the pathname."]) == 1
