"""Resolve the ``model`` config group into ModelArgs and a checkpoint folder, then build this rank's shard."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from deepseek_ptq.errors import UserError
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.checkpoint import check_checkpoint, load_shard
from deepseek_ptq.model.generate import ensure_generated_checkpoint
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.model.transformer import Transformer

log = logging.getLogger(__name__)
PACKAGED = Path(__file__).parent / "configs"
_BASE_KEYS = {"name", "config", "ckpt_dir", "seed", "cache_dir"}


def packaged_configs() -> list[str]:
    return sorted(p.stem for p in PACKAGED.glob("*.json"))


def resolve_args(model_cfg: Any) -> ModelArgs:
    """ModelArgs from the named/packaged config or the checkpoint's config.json, plus command-line overrides."""
    if model_cfg.config is not None:
        path = PACKAGED / f"{model_cfg.config}.json" if model_cfg.config in packaged_configs() else Path(model_cfg.config)
    elif model_cfg.ckpt_dir is not None and (Path(model_cfg.ckpt_dir) / "config.json").exists():
        path = Path(model_cfg.ckpt_dir) / "config.json"
    elif model_cfg.name in packaged_configs():
        path = PACKAGED / f"{model_cfg.name}.json"
    else:
        raise UserError(f"model {model_cfg.name!r} has no config",
                        fix=f"set model.config to a ModelArgs JSON or one of {packaged_configs()}")
    values = ModelArgs.from_json(path).to_dict()
    overrides = {k: v for k, v in dict(model_cfg).items() if k not in _BASE_KEYS and v is not None}
    values.update(overrides)
    return ModelArgs.from_dict(values, source=str(path))


def checkpoint_dir(model_cfg: Any, args: ModelArgs, world_size: int) -> Path:
    """The checkpoint folder, generating the seeded one on first use when none is given."""
    if model_cfg.ckpt_dir is None:
        return ensure_generated_checkpoint(args, model_cfg.seed, world_size, Path(model_cfg.cache_dir).expanduser())
    ckpt_dir = Path(model_cfg.ckpt_dir).expanduser()
    check_checkpoint(ckpt_dir, world_size)
    return ckpt_dir


def build_model(args: ModelArgs, ckpt_dir: Path, par: Parallel, device: torch.device, progress: bool) -> Transformer:
    with torch.device(device):
        model = Transformer(args, par)
    load_shard(model, ckpt_dir, par.rank, par.world_size, progress=progress)
    return model.eval()
