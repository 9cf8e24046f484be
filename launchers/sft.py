"""Supervised fine-tuning of a danube checkpoint on megatron-core (NeMo-Aligner's keys).

    python launchers/sft.py [--config-name danube_tiny_sft] [key=value ...]
    python launchers/sft.py --dry-run 2        # print what would be trained, train nothing
    torchrun --nproc_per_node 8 launchers/sft.py --config-name danube_1.8b_chat_sft ...

Configs live in configs/sft/; the architecture and tokenizer come from the checkpoint the run
starts from (model.restore_from_path: a checkpoint, or a run directory's newest).
"""

import os
import sys

from danube.config import ConfigError, check_launch
from danube.config.compose import SFT_CONFIG_DIR, hydra_runner, to_sft_config
from danube.config.finetune import from_start_checkpoint
from danube.runtime import hide_cuda_for, pop_dry_run, quiet_engine_notices

DRY_RUN = pop_dry_run(sys.argv)  # before Hydra parses the command line


def _fail(error: Exception) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra_runner(config_name="danube_tiny_sft", config_path=str(SFT_CONFIG_DIR))
def main(cfg) -> None:
    quiet_engine_notices()
    config = from_start_checkpoint(to_sft_config(cfg))  # parse: typed, checkpoint's model
    hide_cuda_for(config.trainer.accelerator)
    try:
        check_launch(config)  # validate + preflight: one error listing every problem
    except ConfigError as error:
        _fail(error)
    from danube.data.chat import ChatDataError
    from danube.training.loop import with_machine_precision
    from danube.training.sft import dry_run, run_sft

    try:
        if DRY_RUN:
            print(dry_run(config, DRY_RUN))
            return
        run_sft(*with_machine_precision(config))  # build + run
    except ChatDataError as error:  # bad records: named before anything is built or written
        _fail(error)


if __name__ == "__main__":
    main()
