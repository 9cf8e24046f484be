"""Write the generated raw corpus (danube/prepare/synthetic.py) that the data demo config
(configs/data/web_code_demo.yaml) and bench/data_prep.py read.

    python bench/make_corpus.py --out data/raw --web-mb 20 --code-mb 8
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from danube.prepare.synthetic import write_corpus  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/raw")
    parser.add_argument("--web-mb", type=float, default=20.0)
    parser.add_argument("--code-mb", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--file-mb", type=float, default=8.0,
                        help="text per file: a compressed file is one shard, so several files "
                             "let curation use every core")
    args = parser.parse_args()
    counts = write_corpus(Path(args.out), args.web_mb, args.code_mb, args.seed, args.file_mb)
    print(f"wrote {counts['web_documents']:,} web and {counts['code_documents']:,} code "
          f"documents under {args.out}")


if __name__ == "__main__":
    main()
