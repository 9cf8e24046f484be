"""Direct preference optimization of a danube checkpoint on megatron-core (NeMo-Aligner's
gpt_dpo keys and pair formats).

    python launchers/dpo.py [--config-name danube_tiny_dpo] [key=value ...]
    python launchers/dpo.py --dry-run 2        # print the first pairs as trained, train nothing
    torchrun --nproc_per_node 8 launchers/dpo.py --config-name danube_1.8b_chat_dpo ...

Configs live in configs/dpo/; the architecture and tokenizer come from the checkpoint the run
starts from (model.restore_from_path: a checkpoint, or a run directory's newest), which is
also the reference policy.
"""

from danube import startup_signals

startup_signals.catch()  # before the slow imports: a stop signal now means exit 75 later

import sys

from danube.config.compose import DPO_CONFIG_DIR, hydra_runner, to_dpo_config
from danube.launch import launch_fine_tuning
from danube.runtime import pop_dry_run

DRY_RUN = pop_dry_run(sys.argv)  # before Hydra parses the command line


@hydra_runner(config_name="danube_tiny_dpo", config_path=str(DPO_CONFIG_DIR))
def main(cfg) -> None:
    launch_fine_tuning(to_dpo_config(cfg), "dpo", DRY_RUN)


if __name__ == "__main__":
    main()
