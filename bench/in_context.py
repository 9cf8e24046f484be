"""Does a model use what is in its context? What a chat answer on the question's topic needs.

    python bench/in_context.py results/danube_tiny [more runs or checkpoints] [--chat]

Three probes, the first two scored by one forward pass per batch (danube/inference/score.py):
1. Copying: 16 sequences of 60 random token ids, each written twice. A model that copies
   (induction heads, Olsson et al. 2022, "In-context learning and induction heads") predicts
   the second copy far better than the first: the ratio of their mean NLL falls well below 1.
2. Context length: the mean NLL of the last 10 tokens of 16 windows of the embedded corpus
   (prose and code) given 2, 16, 64 and 240 tokens before them.
3. With --chat (a chat model: the demo's SFT or DPO run): greedy answers to the 64 held-out
   questions of the embedded chat set ("What does `module.function` do?"): how many differ,
   and how many share a word with the function's name or its docstring's first sentence
   (words of 3+ letters, compared on their first 5, generic ones such as "return", "string",
   "file", "given" left out). The anchor is the same count for the reference answers
   shuffled: what sharing a word by chance gives.

The demo's chat question ("What does `module.function` do?") can only be answered on its
topic by a model that carries what the name says into the answer: copying, or knowledge
keyed on the name. Prints a table; figures go to docs/benchmarks.md with the CPU named.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTEXTS = (2, 16, 64, 240)


def _copy_nll(im, rows: int = 16, length: int = 60) -> tuple:
    """(mean NLL of the first copy, of the second) over `rows` random sequences said twice."""
    import torch

    from danube.inference.score import score

    generator = torch.Generator().manual_seed(0)
    low = min(1000, im.vocab // 8)  # past the special and byte tokens of a BPE vocabulary
    sequences = []
    for _ in range(rows):
        ids = torch.randint(low, im.vocab, (length,), generator=generator)
        sequences.append(ids.tolist() * 2)
    first = second = 0.0
    for scored in score(im, sequences):
        logprobs = scored.token_logprobs
        first -= sum(logprobs[1:length]) / (length - 1)
        second -= sum(logprobs[length + 1:]) / (length - 1)
    return first / rows, second / rows


def _windows(im, documents, rows: int = 16) -> list:
    """`rows` windows of CONTEXTS[-1] + 10 tokens from the middle of documents spread over
    the list (one document per stdlib module: its docstrings, or its source)."""
    size = CONTEXTS[-1] + 10
    long_enough = []
    for document in documents[::max(1, len(documents) // (8 * rows))]:
        ids = im.tokenizer.tokenize(document)
        if len(ids) >= size:
            middle = (len(ids) - size) // 2
            long_enough.append(ids[middle:middle + size])
    return long_enough[::max(1, len(long_enough) // rows)][:rows]


def _context_nll(im, windows) -> dict:
    """{context length: mean NLL of the last 10 tokens of each window given that context}."""
    from danube.inference.score import score

    rows = len(windows)
    out = {}
    for context in CONTEXTS:
        scored = score(im, [w[CONTEXTS[-1] - context:] for w in windows])
        out[context] = sum(-sum(s.token_logprobs[-10:]) / 10 for s in scored) / rows
    return out


GENERIC = set("the and for return returns with from this that given into are not its all any "
              "one string object list value values true false none new file containing "
              "representing".split())


def _words(text: str) -> set:
    split = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)  # camelCase -> camel Case
    return {w.lower()[:5] for w in re.findall(r"[A-Za-z]+", split)
            if len(w) >= 3 and w.lower() not in GENERIC}


def _on_topic(questions: list, references: list, answers: list) -> int:
    """How many answers share a word with their question's function name or reference."""
    hits = 0
    for question, reference, answer in zip(questions, references, answers):
        name = question.split("`")[1].rsplit(".", 1)[-1].replace("_", " ")
        hits += bool(_words(answer) & (_words(reference) | _words(name)))
    return hits


def _chat_rows(im, label: str) -> list:
    """The held-out chat questions answered greedily: distinct answers, answers on topic."""
    from danube.data.embedded_chat import held_out_questions
    from danube.inference.chat import chat_prompts
    from danube.inference.generate import Sampling, generate

    questions, references = map(list, zip(*held_out_questions()[:64]))
    prompts, sampling = chat_prompts(im, [[{"role": "user", "content": q}] for q in questions],
                                     Sampling(max_new_tokens=24))
    answers = [g.text for g in generate(im, prompts, sampling, batch=64)]
    shuffled = references[1:] + references[:1]
    n = len(questions)
    return [(label, f"chat: distinct answers of {n}", str(len(set(answers))), str(n), "-"),
            (label, f"chat: answers on topic of {n}", str(_on_topic(questions, references,
                                                                   answers)),
             f"{_on_topic(questions, references, shuffled)} (shuffled references)", "-")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--precision", default="32", choices=["auto", "32", "bf16"])
    parser.add_argument("--chat", action="store_true",
                        help="also answer the held-out chat questions (chat models)")
    args = parser.parse_args(argv)

    from danube.data.embedded import read_documents, stdlib_files
    from danube.inference.model import open_checkpoint

    documents = read_documents(stdlib_files())  # {"prose": [...], "code": [...]}
    rows = []
    for path in args.checkpoints:
        with open_checkpoint(path, precision=args.precision) as im:
            first, second = _copy_nll(im)
            rows.append((str(path), "copy: 2nd vs 1st", f"{second:.2f}", f"{first:.2f}",
                         f"{second / first:.2f}"))
            for name, texts in documents.items():
                nll = _context_nll(im, _windows(im, texts))
                for context in CONTEXTS[1:]:
                    rows.append((str(path), f"{name}: {context} vs {CONTEXTS[0]} before",
                                 f"{nll[context]:.2f}", f"{nll[CONTEXTS[0]]:.2f}",
                                 f"{nll[context] / nll[CONTEXTS[0]]:.2f}"))
            if args.chat:
                rows += _chat_rows(im, str(path))
    print("| checkpoint | probe | NLL | anchor NLL | ratio |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
