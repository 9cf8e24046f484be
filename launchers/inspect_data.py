"""Print sample documents from any stage of a prepared dataset.

    python launchers/inspect_data.py data/web_code_demo --source web --stage removed -n 5
    python launchers/inspect_data.py data/web_code_demo --source web --stage removed \
        --step minhash_dedup
    python launchers/inspect_data.py data/web_code_demo --source code --stage kept

Stages: raw, curated, removed (--step: a filter, exact_dedup or minhash_dedup), kept.
"""

import argparse
import sys
from pathlib import Path

from danube.prepare.inspect import STAGES, inspect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", type=Path, help="output_dir of a prepare_data run")
    parser.add_argument("--source", required=True)
    parser.add_argument("--stage", choices=STAGES, default="kept")
    parser.add_argument("--step", default=None, help="with --stage removed: one step only")
    parser.add_argument("-n", type=int, default=3, help="documents to print")
    parser.add_argument("--seed", type=int, default=0, help="which random sample")
    parser.add_argument("--chars", type=int, default=600, help="characters shown per document")
    args = parser.parse_args()
    if not (args.output_dir / "manifest.json").is_file():
        sys.exit(f"error: {args.output_dir} is not a prepared dataset (no manifest.json)")
    try:
        print(inspect(args.output_dir, args.source, args.stage, args.n, args.step, args.seed,
                      args.chars))
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
