"""Curves and a comparison table for one or more runs.

    python eval/plot.py results/danube_tiny results/danube_tiny_sft results/danube_tiny_dpo
    python eval/plot.py results/a results/b --out plots/a_vs_b

Writes loss.png, lr.png, grad_norm.png, tokens_per_s.png, downstream.png (when
model.downstream_eval ran) and comparison.png/.md (last losses and every checkpoint's
eval/evaluate.py results) into --out (default: <first run>/plots).
"""

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (results/<name>)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from danube.evaluation.plots import PlotError, render

    try:
        written = render(args.runs, args.out or args.runs[0] / "plots")
    except PlotError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
