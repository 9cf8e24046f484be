"""Supervised fine-tuning of a danube checkpoint on megatron-core (NeMo-Aligner's keys).

    python launchers/sft.py [--config-name danube_tiny_sft] [key=value ...]
    python launchers/sft.py --dry-run 2        # print what would be trained, train nothing
    torchrun --nproc_per_node 8 launchers/sft.py --config-name danube_1.8b_chat_sft ...

Configs live in configs/sft/; the architecture and tokenizer come from the checkpoint the run
starts from (model.restore_from_path: a checkpoint, or a run directory's newest).
"""

from danube import startup_signals

startup_signals.catch()  # before the slow imports: a stop signal now means exit 75 later

import sys

from danube.config.compose import SFT_CONFIG_DIR, hydra_runner, to_sft_config
from danube.launch import launch_fine_tuning
from danube.runtime import pop_dry_run

DRY_RUN = pop_dry_run(sys.argv)  # before Hydra parses the command line


@hydra_runner(config_name="danube_tiny_sft", config_path=str(SFT_CONFIG_DIR))
def main(cfg) -> None:
    launch_fine_tuning(to_sft_config(cfg), "sft", DRY_RUN)


if __name__ == "__main__":
    main()
