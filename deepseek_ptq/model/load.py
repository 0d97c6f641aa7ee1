"""Resolve the ``model`` config group into ModelArgs and a checkpoint folder, then build this rank's shard.

The folder is the given ``ckpt_dir``, a packaged checkpoint (``deepseek_ptq/model/<name>/``, stored once unsharded:
W = 1 reads it in place, any other W is sharded from it into the cache), or a seeded generated one (model.synthetic,
sharded into the cache); ``random_weights`` draws on the device instead (RandomWeights).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepseek_ptq.errors import UserError
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.checkpoint import check_checkpoint, ensure_shards, load_shard, shard_name
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.model.safetensors_file import load_safetensors
from deepseek_ptq.model.synthetic import generated_dir, init_random_, random_full_state
from deepseek_ptq.model.transformer import Transformer

PACKAGE_DIR = Path(__file__).parent
PACKAGED = PACKAGE_DIR / "configs"
_REINSTALL = "reinstall deepseek-ptq: a file of its packaged checkpoint is damaged"
_BASE_KEYS = {"name", "config", "ckpt_dir", "packaged_ckpt", "seed", "cache_dir", "random_weights", "generate_weights"}


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
    args = ModelArgs.from_dict(values, source=str(path))
    if model_cfg.config is not None:
        _refuse_other_checkpoint_config(args, path, model_cfg.ckpt_dir)
    return args


def _refuse_other_checkpoint_config(args: ModelArgs, path: Path, ckpt_dir: str | None) -> None:
    """A checkpoint folder's config.json is the model its weights were written for. A model.config (with the
    command line's model.* overrides) that describes another model would be built instead, silently where no
    shape differs (route_scale, rope, max_seq_len), so the two must agree; the user picks one (neither wins by
    a rule nobody sees)."""
    own = Path(ckpt_dir).expanduser() / "config.json" if ckpt_dir is not None else None
    if own is None or not own.is_file():
        return
    differ = args.differences(ModelArgs.from_json(own))
    if differ:
        raise UserError(f"model.config ({path}) and the checkpoint's {own} describe different models "
                        f"({', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''})",
                        fix="set model.config=null to build the checkpoint's own model, or point model.ckpt_dir at a "
                            "checkpoint of this model")


def packaged_dir(name: str) -> Path:
    path = PACKAGE_DIR / name
    if not (path / shard_name(0, 1)).exists():
        have = sorted(p.parent.name for p in PACKAGE_DIR.glob(f"*/{shard_name(0, 1)}"))
        raise UserError(f"no packaged checkpoint named {name!r} (have: {have})",
                        fix="set model.packaged_ckpt to one of those, or model.ckpt_dir to a checkpoint folder")
    return path


def ensure_packaged_checkpoint(name: str, args: ModelArgs, world_size: int, cache_root: Path) -> Path:
    """The packaged checkpoint in place at W = 1, else its shards in a cache folder named by the stored file's
    digest (a newer package never reads stale shards)."""
    source = packaged_dir(name)
    if world_size == 1:
        check_checkpoint(source, 1, fix=_REINSTALL)
        return source
    stored = source / shard_name(0, 1)
    return ensure_shards(cache_root / packaged_id(name), args, world_size, lambda: load_safetensors(stored, _REINSTALL),
                         json.loads((source / "config.json").read_text()))


def packaged_id(name: str) -> str:
    """The packaged checkpoint's name and the digest of its stored file (a newer package never reads stale shards)."""
    stored = packaged_dir(name) / shard_name(0, 1)
    return f"packaged-{name}-{hashlib.sha256(stored.read_bytes()).hexdigest()[:12]}"  # small: tens of MB


def ensure_generated_checkpoint(args: ModelArgs, seed: int, world_size: int, cache_root: Path) -> Path:
    """The seeded checkpoint for (args, seed), drawn unsharded so that every world size holds the same model."""
    return ensure_shards(generated_dir(args, seed, cache_root), args, world_size,
                         lambda: random_full_state(args, seed), args.to_dict())


@dataclass(frozen=True)
class RandomWeights:
    """No checkpoint: the weights are drawn on the device from ``seed`` (model.random_weights)."""

    seed: int

    def __str__(self) -> str:
        return f"random-weights(seed={self.seed})"


def check_source(model_cfg: Any, args: ModelArgs, world_size: int) -> None:
    """Where the weights come from, checked without reading or writing any weight (also before any rank
    starts): ckpt_dir's shards for this world size and their headers, the packaged checkpoint, or a model
    whose weights may be generated or drawn; a full checkpoint to be sharded must split into whole FP8 blocks."""
    if getattr(model_cfg, "random_weights", False):
        if model_cfg.ckpt_dir is not None:
            raise UserError("model.random_weights=true draws the weights, but model.ckpt_dir is set too",
                            fix="drop model.ckpt_dir, or set model.random_weights=false to load the checkpoint")
        return
    if model_cfg.ckpt_dir is not None:
        check_checkpoint(Path(model_cfg.ckpt_dir).expanduser(), world_size)
        return
    if getattr(model_cfg, "packaged_ckpt", None):
        packaged_dir(model_cfg.packaged_ckpt)
    elif not getattr(model_cfg, "generate_weights", False):
        # A real-size model without its checkpoint would otherwise be drawn at random in host memory, for minutes.
        raise UserError(f"model={model_cfg.name} needs its checkpoint: model.ckpt_dir is not set",
                        fix="set model.ckpt_dir to the converted checkpoint folder (deepseek-ptq-convert makes one "
                            "from a Hugging Face checkpoint)")
    args.check_world_size(world_size, whole_fp8_blocks=True)  # sharded from the full checkpoint in the cache


def checkpoint_dir(model_cfg: Any, args: ModelArgs, world_size: int) -> Path | RandomWeights:
    """The checkpoint folder: ``ckpt_dir``, else the packaged or generated one, sharded into the cache on first use."""
    check_source(model_cfg, args, world_size)
    if getattr(model_cfg, "random_weights", False):
        return RandomWeights(model_cfg.seed)
    if model_cfg.ckpt_dir is not None:
        return Path(model_cfg.ckpt_dir).expanduser()
    cache = Path(model_cfg.cache_dir).expanduser()
    if getattr(model_cfg, "packaged_ckpt", None):
        return ensure_packaged_checkpoint(model_cfg.packaged_ckpt, args, world_size, cache)
    return ensure_generated_checkpoint(args, model_cfg.seed, world_size, cache)


def checkpoint_id(model_cfg: Any, ckpt: Path | RandomWeights, world_size: int) -> str:
    """Which weights a run calibrated, the same at every world size: a packaged or generated checkpoint by its
    digest (W = 1 reads the packaged one in place, other W its shards in the cache), a given folder by its path.
    Drawn weights differ with W (each rank draws its own shard)."""
    if isinstance(ckpt, RandomWeights):
        return f"{ckpt} mp{world_size}"
    if model_cfg.ckpt_dir is None and getattr(model_cfg, "packaged_ckpt", None):
        return packaged_id(model_cfg.packaged_ckpt)
    if model_cfg.ckpt_dir is None:
        return ckpt.name  # generated-<digest of the config and seed>
    return str(ckpt.resolve())


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
