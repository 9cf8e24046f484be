"""A launcher wrapper for fault injection: on the ranks listed in $DANUBE_TEST_LAGGING_RANKS
the filesystem view of checkpoints lags (no checkpoint looks complete, as on a node whose
NFS/Lustre attribute cache is stale), then `launchers/<$DANUBE_TEST_STAGE or pretrain>.py`
runs as `__main__`. A rank that decided a collective save from its own view would enter it
alone and hang the job."""

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

if os.environ.get("RANK", "0") in os.environ.get("DANUBE_TEST_LAGGING_RANKS", "").split(","):
    import danube.paths

    danube.paths.is_complete = lambda path: False
    for name in ("danube.training.loop", "danube.training.saving", "danube.training.checkpoint"):
        module = sys.modules.get(name) or __import__(name, fromlist=["_"])
        if hasattr(module, "is_complete"):
            module.is_complete = danube.paths.is_complete

script = ROOT / "launchers" / f"{os.environ.get('DANUBE_TEST_STAGE', 'pretrain')}.py"
sys.argv[0] = str(script)
sys.path[0] = str(script.parent)
runpy.run_path(str(script), run_name="__main__")
