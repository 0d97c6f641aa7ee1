"""Resolve the ``model`` config group into ModelArgs and a checkpoint folder, then build this rank's shard."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepseek_ptq.errors import UserError
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.checkpoint import check_checkpoint, load_shard
from deepseek_ptq.model.generate import ensure_generated_checkpoint
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.model.random_init import init_random_
from deepseek_ptq.model.release import ensure_packaged_checkpoint
from deepseek_ptq.model.transformer import Transformer

log = logging.getLogger(__name__)
PACKAGED = Path(__file__).parent / "configs"
_BASE_KEYS = {"name", "config", "ckpt_dir", "packaged_ckpt", "seed", "cache_dir", "random_weights"}


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


@dataclass(frozen=True)
class RandomWeights:
    """No checkpoint: the weights are drawn on the device from ``seed`` (model.random_weights)."""

    seed: int

    def __str__(self) -> str:
        return f"random-weights(seed={self.seed})"


def checkpoint_dir(model_cfg: Any, args: ModelArgs, world_size: int) -> Path | RandomWeights:
    """The checkpoint folder, generating the seeded one on first use when none is given."""
    if getattr(model_cfg, "random_weights", False):
        if model_cfg.ckpt_dir is not None:
            raise UserError("model.random_weights=true draws the weights, but model.ckpt_dir is set too",
                            fix="drop model.ckpt_dir, or set model.random_weights=false to load the checkpoint")
        return RandomWeights(model_cfg.seed)
    if model_cfg.ckpt_dir is None and getattr(model_cfg, "packaged_ckpt", None):
        return ensure_packaged_checkpoint(model_cfg.packaged_ckpt, args, world_size,
                                          Path(model_cfg.cache_dir).expanduser())
    if model_cfg.ckpt_dir is None:
        return ensure_generated_checkpoint(args, model_cfg.seed, world_size, Path(model_cfg.cache_dir).expanduser())
    ckpt_dir = Path(model_cfg.ckpt_dir).expanduser()
    check_checkpoint(ckpt_dir, world_size)
    return ckpt_dir


def build_model(args: ModelArgs, ckpt_dir: Path | RandomWeights, par: Parallel, device: torch.device,
                progress: bool) -> Transformer:
    with torch.device(device):
        model = Transformer(args, par)
    if isinstance(ckpt_dir, RandomWeights):
        # Every rank draws the same stream (same seed, same shard shapes and order), so replicated weights
        # (gate, norms, wq_a, wkv_a) agree across ranks; a shard is a random matrix like any other.
        init_random_(model, ckpt_dir.seed)
    else:
        load_shard(model, ckpt_dir, par.rank, par.world_size, progress=progress)
    return model.eval()
