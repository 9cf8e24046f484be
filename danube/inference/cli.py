"""Command-line pieces shared by launchers/generate.py and launchers/chat.py."""

from __future__ import annotations

import argparse

from danube.inference.generate import Sampling


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    group = parser.add_argument_group("sampling (default: greedy)")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    group.add_argument("--temperature", type=float, default=0.0,
                       help="0 = greedy; > 0 samples (with --top-k or --top-p, not both)")
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--top-p", type=float, default=0.0)
    group.add_argument("--seed", type=int, default=1234)
    group.add_argument("--stop", action="append", default=[],
                       help="stop string (repeatable); the text ends before it")
    group.add_argument("--add-bos", action="store_true",
                       help="put BOS before the prompt (danube-trained models never saw one)")
    parser.add_argument("--precision", default="auto", choices=["auto", "32", "bf16"])


def sampling_from(args) -> Sampling:
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        stop=tuple(args.stop), add_bos=args.add_bos)
    problems = sampling.problems()
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
    return sampling
