"""Hydra glue: the schema in ConfigStore, the launcher decorator, DictConfig -> dataclass.

Nothing below `launchers/` sees a DictConfig: launchers call `to_pretrain_config` once.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from danube.config.schema import DPOConfig, ModelConfig, PretrainConfig, SFTConfig

SCHEMA_NAME = "danube_pretrain_schema"
PREPARE_SCHEMA_NAME = "danube_prepare_schema"
SFT_SCHEMA_NAME = "danube_sft_schema"
DPO_SCHEMA_NAME = "danube_dpo_schema"
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DATA_CONFIG_DIR = CONFIG_DIR / "data"
SFT_CONFIG_DIR = CONFIG_DIR / "sft"
DPO_CONFIG_DIR = CONFIG_DIR / "dpo"

# NeMo's hydra_runner does the same: no outputs/ directory, no chdir, no logging takeover.
_HYDRA_DEFAULT_OVERRIDES = [
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
]


# Schemas a YAML's `defaults` can name first: the training stages' here; a stage above config/
# adds its own with `add_schema` (data preparation: danube.prepare.config, on import).
_SCHEMAS = {SCHEMA_NAME: PretrainConfig, SFT_SCHEMA_NAME: SFTConfig, DPO_SCHEMA_NAME: DPOConfig}


def add_schema(name: str, node: type) -> None:
    """Make `node` composable under `name` (registered with the others before each compose)."""
    _SCHEMAS[name] = node


def register_schemas() -> None:
    """Register the typed schemas that every YAML in configs/ (pretraining, SFT, DPO) and
    configs/data/ (data preparation, once danube.prepare.config is imported) lists first in
    `defaults`."""
    for name, node in _SCHEMAS.items():
        ConfigStore.instance().store(name=name, node=node)


def hydra_runner(config_name: str, config_path: Optional[str] = None) -> Callable:
    """`@hydra.main` that writes nothing (bad configs must leave no trace) and composes
    against the registered schema. `--config-name`, `--config-path`, `--cfg job` and
    `key=value` overrides work as with Hydra."""

    def decorator(task: Callable[[DictConfig], None]) -> Callable[[], None]:
        @functools.wraps(task)
        def wrapper() -> None:
            register_schemas()
            given = {a.split("=", 1)[0].lstrip("+~") for a in sys.argv[1:] if "=" in a}
            defaults = [o for o in _HYDRA_DEFAULT_OVERRIDES if o.split("=", 1)[0] not in given]
            sys.argv = [*sys.argv, *defaults]  # after the user's options and overrides
            hydra.main(
                config_path=config_path or str(CONFIG_DIR),
                config_name=config_name,
                version_base=None,
            )(task)()

        return wrapper

    return decorator


def to_pretrain_config(cfg: DictConfig) -> PretrainConfig:
    """Resolve interpolations and return the typed dataclass (trainer.max_steps=-1 with
    seq_length_stages: the stages' steps)."""
    from danube.config.derived import with_stage_steps

    return with_stage_steps(_typed(cfg, PretrainConfig, SCHEMA_NAME))


def _typed(cfg: DictConfig, schema: type, schema_name: str):
    """Resolve interpolations and return the typed dataclass of `schema`."""
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, schema):
        raise TypeError(f"config composed to {type(obj).__name__}, not {schema.__name__}: its "
                        f"defaults list must start with '{schema_name}'")
    return obj


def _compose(config_dir, config_name: str, overrides: Optional[List[str]]) -> DictConfig:
    """Compose like a launcher does, without running anything (tests, tools)."""
    register_schemas()
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return hydra.compose(config_name=config_name, overrides=list(overrides or []))


def to_sft_config(cfg: DictConfig) -> SFTConfig:
    return _typed(cfg, SFTConfig, SFT_SCHEMA_NAME)


def compose_sft_config(config_name: str, overrides: Optional[List[str]] = None,
                       config_dir: Optional[str] = None) -> SFTConfig:
    """Compose a configs/sft/ config like launchers/sft.py does (before the checkpoint's
    architecture is read: see `danube.config.finetune`)."""
    return to_sft_config(_compose(config_dir or SFT_CONFIG_DIR, config_name, overrides))


def to_dpo_config(cfg: DictConfig) -> DPOConfig:
    return _typed(cfg, DPOConfig, DPO_SCHEMA_NAME)


def compose_dpo_config(config_name: str, overrides: Optional[List[str]] = None,
                       config_dir: Optional[str] = None) -> DPOConfig:
    """Compose a configs/dpo/ config like launchers/dpo.py does."""
    return to_dpo_config(_compose(config_dir or DPO_CONFIG_DIR, config_name, overrides))


def load_model_config(path: os.PathLike) -> ModelConfig:
    """The model section of any saved danube config (pretraining, SFT, ...) as a ModelConfig:
    architecture, parallelism and the rest; stage-specific keys (SFT data, ...) dropped."""
    loaded = OmegaConf.load(path).get("model", {})
    known = {k: v for k, v in OmegaConf.to_container(loaded).items()
             if k in ModelConfig.__dataclass_fields__ and k != "data"}
    merged = OmegaConf.merge(OmegaConf.structured(PretrainConfig), {"model": known})
    return OmegaConf.to_object(merged).model


def compose_pretrain_config(
    config_name: str, overrides: Optional[List[str]] = None, config_dir: Optional[str] = None
) -> PretrainConfig:
    """Compose like the launcher does, without running anything (tests, tools)."""
    return to_pretrain_config(_compose(config_dir or CONFIG_DIR, config_name, overrides))


def to_yaml(config: PretrainConfig) -> str:
    """The fully resolved config, as saved beside every checkpoint."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def load_yaml_config(path: os.PathLike) -> PretrainConfig:
    """Read a saved config back into the schema (strict: unknown keys fail). A Hydra
    `defaults` list, as configs written for the launcher carry, is ignored."""
    loaded = OmegaConf.load(path)
    loaded.pop("defaults", None)
    merged = OmegaConf.merge(OmegaConf.structured(PretrainConfig), loaded)
    return OmegaConf.to_object(merged)


def config_changes(before: str, after: str) -> List[str]:
    """'key: old -> new' for every setting that differs between two saved config YAML texts
    (a checkpoint's config.yaml and the run resuming from it), keys dotted, sorted."""

    def flat(node, prefix=""):
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                out.update(flat(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: node}

    old = flat(OmegaConf.to_container(OmegaConf.create(before), resolve=False) or {})
    new = flat(OmegaConf.to_container(OmegaConf.create(after), resolve=False) or {})
    missing = object()
    return [f"{key}: {old.get(key, '(absent)')} -> {new.get(key, '(absent)')}"
            for key in sorted(set(old) | set(new))
            if old.get(key, missing) != new.get(key, missing)]
