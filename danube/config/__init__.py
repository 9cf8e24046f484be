"""Configuration: typed schema, Hydra composition, pure validation, launch preflight."""

from danube.config.schema import PretrainConfig
from danube.config.validate import ConfigError, raise_if_problems, validate


def check_launch(cfg: PretrainConfig, machine=None) -> None:
    """Config checks and launch preflight together: one ConfigError listing every problem,
    raised before any model or data is built. Writes nothing."""
    import sys

    from danube.config.preflight import detect_machine, launch_warnings, preflight
    from danube.runtime import launch_info

    problems = validate(cfg)
    problems += preflight(cfg, machine or detect_machine())
    raise_if_problems(problems)
    if launch_info().rank == 0:
        for warning in launch_warnings(cfg):
            print(f"warning: {warning}", file=sys.stderr, flush=True)


__all__ = ["ConfigError", "PretrainConfig", "check_launch", "validate"]
