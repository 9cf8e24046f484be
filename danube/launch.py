"""The body shared by the fine-tuning launchers (launchers/sft.py, launchers/dpo.py): the
typed config with the starting checkpoint's model, every config problem at once, then the
dry run or the job; data and reference errors end the launch with a message, not a trace."""

from __future__ import annotations

import importlib
import os
import sys


def fail(error: Exception) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def downstream_scorer(config):
    """The scorer the training loop calls for model.downstream_eval, or None when it names no
    tasks (evaluation sits above training: the launcher hands it down)."""
    if not config.model.downstream_eval.tasks:
        return None
    from danube.evaluation.downstream import score_live_model

    return score_live_model


def launch_fine_tuning(config, stage: str, dry_run: int) -> None:
    """`stage` names the module danube.training.<stage>, which has run_<stage>(cfg, precision)
    and dry_run(cfg, n)."""
    from danube.config import ConfigError, check_launch
    from danube.config.finetune import from_start_checkpoint
    from danube.runtime import hide_cuda_for, quiet_engine_notices

    quiet_engine_notices()
    config = from_start_checkpoint(config)  # the starting checkpoint's architecture
    hide_cuda_for(config.trainer.accelerator)
    try:
        check_launch(config)  # validate + preflight: one error listing every problem
    except ConfigError as error:
        fail(error)
    from danube.data.chat import ChatDataError
    from danube.training.loop import with_machine_precision

    module = importlib.import_module(f"danube.training.{stage}")
    errors = (ChatDataError,) + tuple(getattr(module, "LAUNCH_ERRORS", ()))
    try:
        if dry_run:
            print(module.dry_run(config, dry_run))
            return
        getattr(module, f"run_{stage}")(*with_machine_precision(config),
                                        downstream=downstream_scorer(config))
    except errors as error:  # bad records (before anything is built or written), a reference
        fail(error)          # that is not the starting model (at step 1, before any save)
