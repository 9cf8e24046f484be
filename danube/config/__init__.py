"""Configuration: typed schema, Hydra composition, pure validation, launch preflight."""

from danube.config.schema import PretrainConfig
from danube.config.validate import ConfigError, raise_if_problems, validate


def check_launch(cfg: PretrainConfig, machine=None) -> None:
    """Config checks and launch preflight together: one ConfigError listing every problem,
    raised before any model or data is built. Writes nothing."""
    from danube.config.preflight import detect_machine, preflight

    problems = validate(cfg)
    problems += preflight(cfg, machine or detect_machine())
    raise_if_problems(problems)


__all__ = ["ConfigError", "PretrainConfig", "check_launch", "validate"]
