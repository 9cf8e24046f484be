"""Running a stage's tasks: inline (one worker) or in spawned processes, costliest first,
each marked done (`.done.json`) when its files are in place so a re-run skips it."""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Dict, List, Optional

from danube.prepare.plan import write_json


def quiet_logs() -> None:
    """datatrove logs every stage at INFO (and installs its handler on import) and draws
    progress bars; our own progress lines say enough."""
    import datatrove.utils.logging  # noqa: F401  (adds its handler: import before removing)
    from loguru import logger

    os.environ.setdefault("TQDM_DISABLE", "1")
    logger.remove()
    logger.add(sys.stderr, level="ERROR")


def _worker_init() -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # one tokenizer thread per worker process
    quiet_logs()


def _ready() -> None:
    pass


class Runner:
    """Runs per-shard tasks inline (one worker) or in spawned processes; marks each done."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None if workers == 1 else ProcessPoolExecutor(
            workers, mp_context=get_context("spawn"), initializer=_worker_init)
        if self.pool is not None:  # start the workers now, while we plan
            for _ in range(workers):
                self.pool.submit(_ready)

    def stage(self, label: str, fn: Callable[[object], dict], tasks: List[object],
              markers: List[Path], costs: Optional[List[float]] = None) -> List[dict]:
        """Results in task order; with `costs`, the costliest tasks are started first (so that
        the last ones to finish are small and no worker idles long at the end)."""
        results: Dict[int, dict] = {}
        todo = []
        for i, marker in enumerate(markers):
            if marker.is_file():
                results[i] = json.loads(marker.read_text())
            else:
                todo.append(i)
        resumed = len(results)

        def finish(i: int, result: dict) -> None:
            markers[i].parent.mkdir(parents=True, exist_ok=True)
            write_json(markers[i], result)
            results[i] = result

        if self.pool is None:
            for i in todo:
                finish(i, fn(tasks[i]))
        else:
            if costs is not None:
                todo.sort(key=lambda i: -costs[i])
            futures = {self.pool.submit(fn, tasks[i]): i for i in todo}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise future.exception()
                    finish(futures[future], future.result())
        note = f" ({resumed} already done)" if resumed else ""
        print(f"  {label}: {len(markers)} task(s){note}", flush=True)
        return [results[i] for i in range(len(markers))]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def once(marker: Path, fn: Callable[[], None]) -> None:
    if not marker.is_file():
        fn()
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_json(marker, {})


