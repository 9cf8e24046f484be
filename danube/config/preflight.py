"""Launch-time checks: the machine, the launch and the files the config points at.

Run after `validate` and before any model or data is built; problems are collected and
raised with the config's in one `ConfigError`. Nothing here writes anything.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional

import torch

from danube.config.compose import load_model_config
from danube.config.derived import (
    ARCHITECTURE_KEYS,
    EMBEDDED_CHAT,
    EMBEDDED_PREFIX,
    blend_paths,
    padded_vocab_size,
    stage_blends,
    world_size,
)
from danube.config.schema import DPOConfig, PretrainConfig, SFTConfig
from danube.indexed_files import (
    documents_for_splits,
    empty_splits,
    indexed_dataset_problem,
    sequence_count,
)
from danube.paths import (
    CONFIG_FILE,
    checkpoint_problem,
    checkpoint_root,
    checkpoint_tensor_shapes,
    is_complete,
    latest_checkpoint,
    read_meta,
)
from danube.runtime import launch_info, resolve_precision, transformer_engine_available


@dataclass(frozen=True)
class Machine:
    world_size: int
    """Processes in this launch (torchrun/SLURM environment, else 1)."""
    cuda: bool
    transformer_engine: bool
    launcher: str = "single"
    """danube.runtime.LaunchInfo.launcher."""


def detect_machine() -> Machine:
    info = launch_info()
    return Machine(info.world_size, torch.cuda.is_available(), transformer_engine_available(),
                   info.launcher)


def _check_machine(cfg: PretrainConfig, machine: Machine, problems: List[str]) -> None:
    m, want = cfg.model, world_size(cfg)
    if machine.launcher == "slurm-batch":
        problems.append(f"started by plain python inside a SLURM allocation of "
                        f"{machine.world_size} tasks (SLURM_NTASKS, no job step): start one "
                        "process per task with srun, as launchers/slurm/pretrain.sbatch does "
                        "(alone it would wait 30 minutes for peers that never start)")
    elif machine.world_size != want:
        problems.append(f"launched with {machine.world_size} process(es) but trainer.devices x "
                        f"trainer.num_nodes = {want}: set trainer.devices={machine.world_size} "
                        f"(one node) or launch {want} processes (torchrun --nproc_per_node)")
    if cfg.trainer.accelerator == "gpu" and not machine.cuda:
        problems.append("trainer.accelerator=gpu but no CUDA device is visible; use "
                        "trainer.accelerator=auto or cpu")
    cuda = machine.cuda and cfg.trainer.accelerator != "cpu"  # this run trains on a GPU
    gpu_te = cuda and machine.transformer_engine
    if m.fp8 and not gpu_te:
        missing = "no CUDA GPU" if not machine.cuda else "Transformer Engine is not installed"
        problems.append(f"model.fp8=true needs Transformer Engine on a CUDA GPU (Hopper or "
                        f"newer), but {missing}: set model.fp8=false to train in bf16 here")
    if m.context_parallel_size > 1 and not gpu_te:
        problems.append("model.context_parallel_size > 1 needs Transformer Engine's attention "
                        "on a CUDA GPU; set it to 1 here")
    te_attention = gpu_te and m.transformer_engine and m.attention_backend not in ("sdpa", "local")
    if getattr(m.data, "reset_attention_mask", False) and te_attention:
        problems.append("model.data.reset_attention_mask=true: Transformer Engine's causal "
                        f"attention (model.attention_backend={m.attention_backend}) ignores the "
                        "attention mask; use model.attention_backend=sdpa, or set it to false")
    lora = getattr(getattr(m, "peft", None), "peft_scheme", "none") == "lora"
    if lora and gpu_te and m.transformer_engine:
        problems.append("model.peft.peft_scheme=lora wraps megatron's local linears; with "
                        "Transformer Engine layers (fused norm + linear) it is not wired yet: "
                        "set model.transformer_engine=false")
    if (cfg.trainer.nan_policy == "skip"
            and resolve_precision(cfg.trainer.precision, cuda).precision == "32"):
        problems.append("trainer.nan_policy=skip runs under bf16 (megatron skips an update "
                        "through its grad scaler's found-inf check, which fp32 training has "
                        "not), but this run trains in fp32: set trainer.precision=bf16-mixed, "
                        "or trainer.nan_policy=stop")
    if m.attention_backend == "flex" and not cuda:
        problems.append("model.attention_backend=flex trains on a CUDA GPU only (torch's "
                        "FlexAttention has no backward pass on a CPU): use auto or sdpa here")
    if m.attention_backend in ("flash", "fused", "unfused") and not gpu_te:
        problems.append(f"model.attention_backend={m.attention_backend} is a Transformer Engine "
                        "backend, unavailable here; use auto, sdpa or local")
    if importlib.util.find_spec("psutil") is None:
        problems.append("psutil is not installed: megatron-core's checkpoint writer hangs "
                        "without it; pip install psutil")


def _check_files(cfg: PretrainConfig, problems: List[str]) -> None:
    m = cfg.model
    blends = [("model.data.data_prefix", m.data)] + [
        (key, replace(m.data, data_prefix=blend)) for key, blend in stage_blends(m)]
    for key, data in blends:
        for prefix in blend_paths(data):
            if prefix.startswith(EMBEDDED_PREFIX):
                continue
            missing = [ext for ext in (".bin", ".idx") if not Path(prefix + ext).is_file()]
            if missing:
                problems.append(f"{key}: {prefix}{' and '.join(missing)} not found; each "
                                "prefix names a Megatron indexed dataset, the files "
                                "<prefix>.bin and <prefix>.idx")
            elif (problem := indexed_dataset_problem(prefix)) is not None:
                problems.append(f"{key}: {problem}")
            elif not isinstance(data.data_prefix, dict):
                _check_split_sizes(prefix, data.splits_string, problems)
    _check_tokenizer(m, problems)


def _tokenizer_json(m) -> Path:
    path = Path(m.tokenizer.model or "")
    return path / "tokenizer.json" if path.is_dir() else path


@functools.lru_cache(maxsize=4)
def _tokens_in(json_path: str, mtime_ns: int, size: int) -> int:
    """Tokens of a tokenizer.json, parsed once per file version (several checks ask)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(json_path).get_vocab_size(with_added_tokens=True)


def tokenizer_vocab_size(m) -> Optional[int]:
    """Tokens of the configured tokenizer (None when its file is missing: reported apart)."""
    if m.tokenizer.library == "embedded":
        return m.tokenizer.vocab_size
    json_path = _tokenizer_json(m)
    if not json_path.is_file():
        return None
    stat = json_path.stat()
    return _tokens_in(str(json_path), stat.st_mtime_ns, stat.st_size)


def _check_tokenizer(m, problems: List[str]) -> None:
    """The tokenizer file is there, and the model has a row for each of its tokens."""
    if m.tokenizer.library == "huggingface" and m.tokenizer.model \
            and not _tokenizer_json(m).is_file():
        problems.append(f"model.tokenizer.model={m.tokenizer.model}: no tokenizer.json there; "
                        "give the file or the directory that holds it")
    vocab = tokenizer_vocab_size(m)
    if vocab is not None and m.vocab_size is not None and vocab > m.vocab_size:
        problems.append(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                        f"{vocab} tokens: raise it, or null to use the tokenizer's size")


def _check_split_sizes(prefix: str, splits_string: str, problems: List[str]) -> None:
    """Each prefix is split by documents: every split with a share must get one."""
    sequences = sequence_count(prefix)
    empty = empty_splits(sequences, splits_string)
    if empty:
        problems.append(
            f"model.data.data_prefix: {prefix} holds {sequences} document(s), and "
            f"model.data.splits_string={splits_string!r} leaves the {' and '.join(empty)} "
            f"split(s) none of them (megatron-core would hang building them): prepare more "
            f"documents (at least {documents_for_splits(splits_string)}), or change "
            "splits_string")


def _check_checkpoints(cfg: PretrainConfig, problems: List[str]) -> None:
    em = cfg.exp_manager
    root = checkpoint_root(em)
    latest = latest_checkpoint(root)
    if latest is not None and not em.resume_if_exists:
        problems.append(f"{root} already holds checkpoints (newest: "
                        f"{latest.name}) and exp_manager.resume_if_exists=false would overwrite "
                        "them: set resume_if_exists=true, or choose another exp_manager.name")
    if latest is None and em.resume_if_exists and not em.resume_ignore_no_checkpoint:
        problems.append(f"exp_manager.resume_if_exists=true and resume_ignore_no_checkpoint="
                        f"false, but {root} holds no complete checkpoint")
    restore = cfg.model.restore_from_path
    if restore and not is_complete(Path(restore)):
        problems.append(f"model.restore_from_path={restore} is not a complete danube checkpoint "
                        "(a step_* directory holding danube_checkpoint.json; SFT also takes a "
                        "run directory: its newest checkpoint. `make demo` pretrains danube_tiny "
                        "first)")
    resuming = latest is not None and em.resume_if_exists
    source = latest if resuming else (
        Path(restore) if restore and is_complete(Path(restore)) else None)
    if source is not None:
        _check_checkpoint_content(cfg, source, resuming, problems)


def _check_checkpoint_content(cfg: PretrainConfig, source: Path, resuming: bool,
                              problems: List[str]) -> None:
    """The checkpoint a launch will load: whole, and of the same architecture."""
    problem = checkpoint_problem(source)
    if problem is not None:
        fix = ("move it out of the checkpoints directory to resume from the one before"
               if resuming else "point model.restore_from_path at another checkpoint")
        problems.append(f"checkpoint {problem}; {fix}")
        return
    try:
        saved = load_model_config(source / CONFIG_FILE)
    except Exception as error:  # an unreadable or foreign config is reported, not raised
        problems.append(f"{source / CONFIG_FILE} does not parse as a danube config: {error}")
        return
    for key in ARCHITECTURE_KEYS:
        old, new = getattr(saved, key), getattr(cfg.model, key)
        if old != new:
            problems.append(f"model.{key}={new!r} but the checkpoint {source} was trained with "
                            f"{old!r}; restore the value or start a new experiment name")
    _check_embedding_rows(cfg.model, source, problems)
    meta = read_meta(source)
    layout = (cfg.model.tensor_model_parallel_size, cfg.model.pipeline_model_parallel_size)
    saved_layout = (meta.layout.get("tp"), meta.layout.get("pp"))
    if resuming and meta.optimizer_sharding == "dp_reshardable" and saved_layout != layout:
        problems.append(f"{source} holds distributed-optimizer state for TP x PP = "
                        f"{saved_layout[0]} x {saved_layout[1]}, which reshards across data-"
                        f"parallel sizes only: resume with that layout (now {layout[0]} x "
                        f"{layout[1]}), or start a new experiment with model.restore_from_path")


def _check_embedding_rows(m, source: Path, problems: List[str]) -> None:
    """The checkpoint's vocabulary rows (its metadata) against what this config builds."""
    vocab = tokenizer_vocab_size(m)
    try:
        rows = checkpoint_tensor_shapes(source).get("embedding.word_embeddings.weight")
    except Exception as error:  # a damaged .metadata is reported, not raised
        problems.append(f"{source}/.metadata is unreadable ({error}): not a whole checkpoint")
        return
    if vocab is None or rows is None:
        return
    want = padded_vocab_size(vocab, m)
    if rows[0] != want:
        problems.append(
            f"{source} has {rows[0]} vocabulary rows but this config builds {want} "
            f"({m.vocab_size or vocab} tokens padded to a multiple of "
            f"model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by}): use the "
            f"checkpoint's tokenizer, or set model.vocab_size / make_vocab_size_divisible_by "
            f"so that they give {rows[0]}")


def _check_sft_files(cfg: SFTConfig, problems: List[str]) -> None:
    m = cfg.model
    for split in ("train_ds", "validation_ds"):
        file_path = getattr(m.data, split).file_path
        paths = [] if file_path is None else (
            [file_path] if isinstance(file_path, str) else list(file_path))
        for path in paths:
            if path not in EMBEDDED_CHAT and not Path(path).is_file():
                problems.append(f"model.data.{split}.file_path: {path} not found (a JSONL file "
                                "of conversations)")
    _check_tokenizer(m, problems)
    _check_start_adapters(m, problems)


def _check_start_adapters(m, problems: List[str]) -> None:
    """A fine-tuning run starting from a LoRA run's checkpoint merges its adapters on loading,
    which needs adapters of the same targets and rank in this run."""
    from omegaconf import OmegaConf

    from danube.model_names import LORA_TARGETS

    start = Path(m.restore_from_path) if m.restore_from_path else None
    if start is None or not is_complete(start) or not (start / CONFIG_FILE).is_file():
        return
    saved = OmegaConf.select(OmegaConf.load(start / CONFIG_FILE), "model.peft")
    if saved is None or saved.get("peft_scheme") != "lora":
        return
    theirs, ours = saved.lora_tuning, m.peft.lora_tuning
    same = m.peft.peft_scheme == "lora" and ours.adapter_dim == theirs.adapter_dim and \
        {LORA_TARGETS[t] for t in ours.target_modules} == \
        {LORA_TARGETS[t] for t in theirs.target_modules if t in LORA_TARGETS}
    if not same:
        problems.append(
            f"model.restore_from_path={start} was written by a LoRA run (adapter_dim "
            f"{theirs.adapter_dim}, target_modules {list(theirs.target_modules)}): its adapters "
            "are merged into the base weights on loading, which needs the same "
            "model.peft.lora_tuning.adapter_dim and target_modules here (model.peft.peft_scheme"
            "=lora); or merge them first (conversion/mcore_to_hf.py, then hf_to_mcore.py)")


def _check_dpo_files(cfg: DPOConfig, problems: List[str]) -> None:
    prefix = cfg.model.data.data_prefix
    for split, file_path in (prefix.items() if isinstance(prefix, dict) else ()):
        paths = [] if not file_path else (
            [file_path] if isinstance(file_path, str) else list(file_path))
        for path in paths:
            if path not in EMBEDDED_CHAT and not Path(path).is_file():
                problems.append(f"model.data.data_prefix.{split}: {path} not found (a JSONL file "
                                "of preference pairs)")
    _check_tokenizer(cfg.model, problems)
    _check_start_adapters(cfg.model, problems)


# Each stage's own files (data, tokenizer), by config type.
STAGE_FILES = {PretrainConfig: _check_files, SFTConfig: _check_sft_files,
               DPOConfig: _check_dpo_files}


# Filesystems that live on one machine: a multi-node run's exp_dir there is a different
# directory on every node (each rank's own checkpoints; a resume on one node sees none).
LOCAL_FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs",
                     "vfat", "ramfs")


def filesystem_type(path: Path, mounts: str = "/proc/mounts") -> Optional[str]:
    """The type of the filesystem holding `path` (its nearest existing parent), from the
    longest mount point above it; None where the mount table cannot be read."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    target = Path(path).absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    target = target.resolve()
    best, kind = -1, None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = str(target) == point or str(target).startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, kind = len(point), fields[2]
    return kind


def launch_warnings(cfg, mounts: str = "/proc/mounts") -> List[str]:
    """What may go wrong but need not (said, not refused)."""
    warnings = []
    if cfg.trainer.num_nodes > 1:
        kind = filesystem_type(Path(cfg.exp_manager.exp_dir), mounts)
        if kind in LOCAL_FILESYSTEMS:
            warnings.append(
                f"exp_manager.exp_dir={cfg.exp_manager.exp_dir} is on a {kind} filesystem, "
                f"local to this node, while trainer.num_nodes={cfg.trainer.num_nodes}: every "
                "node would keep its own checkpoints and a requeued job on other nodes would "
                "not find them. Point exp_dir at a filesystem all nodes share (NFS, Lustre, "
                "GPFS...)")
    return warnings


def preflight(cfg, machine: Machine) -> List[str]:
    """Every launch-time problem of a pretraining, SFT or DPO launch (never raises, never
    writes)."""
    problems: List[str] = []
    _check_machine(cfg, machine, problems)
    STAGE_FILES[type(cfg)](cfg, problems)
    _check_checkpoints(cfg, problems)
    return problems
