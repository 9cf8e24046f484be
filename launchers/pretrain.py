"""Pretrain a Danube-family model on megatron-core.

    python launchers/pretrain.py [--config-name danube_tiny] [key=value ...]
    torchrun --nproc_per_node 8 launchers/pretrain.py --config-name danube_1.8b

Configs live in configs/ (NeMo megatron_gpt_config.yaml layout); any key can be overridden
on the command line, Hydra style.
"""

from danube import startup_signals

startup_signals.catch()  # before the slow imports: a stop signal now means exit 75 later

import os
import sys

from danube.config import ConfigError, check_launch
from danube.config.compose import hydra_runner, to_pretrain_config
from danube.runtime import hide_cuda_for, quiet_engine_notices


@hydra_runner(config_name="danube_tiny")
def main(cfg) -> None:
    config = to_pretrain_config(cfg)  # parse: typed schema, interpolations resolved
    hide_cuda_for(config.trainer.accelerator)  # accelerator=cpu on a GPU host: no CUDA at all
    try:
        check_launch(config)  # validate + preflight: one error listing every problem
    except ConfigError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    quiet_engine_notices()
    from danube.launch import downstream_scorer
    from danube.training.pretrain import run_pretraining

    run_pretraining(config, downstream_scorer(config))  # build + run


if __name__ == "__main__":
    main()
