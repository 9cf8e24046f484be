"""Direct preference optimization of a danube checkpoint on megatron-core (NeMo-Aligner's
gpt_dpo keys and pair formats).

    python launchers/dpo.py [--config-name danube_tiny_dpo] [key=value ...]
    python launchers/dpo.py --dry-run 2        # print the first pairs as trained, train nothing
    torchrun --nproc_per_node 8 launchers/dpo.py --config-name danube_1.8b_chat_dpo ...

Configs live in configs/dpo/; the architecture and tokenizer come from the checkpoint the run
starts from (model.restore_from_path: a checkpoint, or a run directory's newest), which is
also the reference policy.
"""

import os
import sys

from danube.config import ConfigError, check_launch
from danube.config.compose import DPO_CONFIG_DIR, hydra_runner, to_dpo_config
from danube.config.finetune import from_start_checkpoint
from danube.runtime import hide_cuda_for, pop_dry_run, quiet_engine_notices

DRY_RUN = pop_dry_run(sys.argv)  # before Hydra parses the command line


def _fail(error: Exception) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra_runner(config_name="danube_tiny_dpo", config_path=str(DPO_CONFIG_DIR))
def main(cfg) -> None:
    quiet_engine_notices()
    config = from_start_checkpoint(to_dpo_config(cfg))  # parse: typed, checkpoint's model
    hide_cuda_for(config.trainer.accelerator)
    try:
        check_launch(config)  # validate + preflight: one error listing every problem
    except ConfigError as error:
        _fail(error)
    from danube.data.chat import ChatDataError
    from danube.training.loop import with_machine_precision
    from danube.training.dpo import ReferenceMismatch, dry_run, run_dpo

    try:
        if DRY_RUN:
            print(dry_run(config, DRY_RUN))
            return
        run_dpo(*with_machine_precision(config))  # build + run
    except (ChatDataError, ReferenceMismatch) as error:  # bad records: named before anything
        _fail(error)                                      # is built or written


if __name__ == "__main__":
    main()
