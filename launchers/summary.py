"""Print what each stage of a pipeline run did (the end of `make demo`).

    python launchers/summary.py results/danube_tiny results/danube_tiny_sft
"""

import sys

from danube.training.metrics import summarize

if __name__ == "__main__":
    print(summarize(sys.argv[1:] or ["results/danube_tiny", "results/danube_tiny_sft"]))
