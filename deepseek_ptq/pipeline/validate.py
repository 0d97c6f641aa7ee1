"""Every check a run can make before any rank starts and before any weight is read, in seconds: the config's
keys, the model's config (against the checkpoint's own), the world size, the checkpoint's files, the data and
the quantization preset. A problem is one UserError naming it and the fix; the ranks then meet no bad input
that this step could have found."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepseek_ptq.common import choice
from deepseek_ptq.errors import UserError
from deepseek_ptq.model.args import ModelArgs, refuse_compressed_weights
from deepseek_ptq.model.load import check_source, resolve_args
from deepseek_ptq.pipeline.config import check_known_keys, eval_enabled
from deepseek_ptq.pipeline.data import check_data
from deepseek_ptq.quant.recipes import check_kv_cache, check_overrides, load_preset


def validate(cfg: Any) -> ModelArgs:
    """The model's arguments, once everything checkable about the run is known to be sound."""
    check_known_keys(cfg)
    _refuse_compressed_checkpoint(cfg.model.ckpt_dir)
    args = resolve_args(cfg.model)
    world_size = cfg.parallel.world_size
    args.check_world_size(world_size)
    check_source(cfg.model, args, world_size)
    check_data(cfg.data, args.vocab_size, cfg.model.ckpt_dir, args.max_seq_len)
    _check_eval(cfg)
    check_overrides(cfg.quant, args)
    check_kv_cache(cfg.quant)
    _check_experts_ratio(cfg.calib)
    _check_algorithm(cfg, load_preset(cfg.quant.preset))  # imports modelopt (seconds): last, once the rest holds
    return args


def _static_block_weights(preset: dict[str, Any]) -> bool:
    """Whether the preset gives weights NVFP4 static block scales (MSE, local Hessian, four-over-six)."""
    for entry in preset["quant_cfg"]:
        cfg = entry.get("cfg") if isinstance(entry, dict) else None
        blocks = cfg.get("block_sizes") if isinstance(cfg, dict) else None
        if isinstance(blocks, dict) and blocks.get("type", "static") == "static" and tuple(cfg.get("num_bits") or ()) == (2, 1):
            return True
    return False


def _check_algorithm(cfg: Any, preset: dict[str, Any]) -> None:
    """Recipes the layer-streamed or multi-rank paths have not been verified with, refused before any rank."""
    from deepseek_ptq.quant.recipes import algorithm_method

    method = algorithm_method({"algorithm": cfg.quant.algorithm if cfg.quant.algorithm is not None else preset["algorithm"]})
    if cfg.calib.layerwise and method != "max":
        # MSE and local Hessian search per layer, but local Hessian runs the forward loop twice (the second pass with
        # quantized inputs), which the stream would take as the next layer's inputs: neither is verified yet.
        raise UserError(f"calib.layerwise=true calibrates with max statistics; algorithm {method!r} "
                        f"(quant.preset={cfg.quant.preset}) is not supported layer by layer yet",
                        fix="set calib.layerwise=false (the resident run) for this recipe")
    if cfg.parallel.world_size > 1 and _static_block_weights(preset):
        raise UserError(f"quant.preset={cfg.quant.preset} gives weights static NVFP4 block scales, verified at "
                        f"parallel.world_size=1 only: the block amax and global amax of tensor-parallel shards are "
                        f"not merged across ranks (world size {cfg.parallel.world_size})",
                        fix="run it with parallel=single")


def _refuse_compressed_checkpoint(ckpt_dir: str | None) -> None:
    """A checkpoint folder holding a Hugging Face config.json with compressed-tensors weights (Kimi-K2-Thinking's
    INT4 experts): refused by name, before its config is read as a model's (an unreadable file is left to
    resolve_args, which names the problem)."""
    path = Path(ckpt_dir).expanduser() / "config.json" if ckpt_dir is not None else None
    if path is None or not path.is_file():
        return
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    if isinstance(values, dict):
        refuse_compressed_weights(values, str(path))


def _check_experts_ratio(calib: Any) -> None:
    ratio = calib.experts_ratio
    if ratio is None:
        return
    if choice(calib.name) != "topk":
        raise UserError(f"calib.experts_ratio={ratio:g} with calib={choice(calib.name)}: the ratio forces more experts "
                        "onto top-k calibration, and all_experts is ratio 1 already",
                        fix=f"use calib=topk calib.experts_ratio={ratio:g} (calib.sync as you want it), or drop "
                            "calib.experts_ratio")
    if not 0 < ratio <= 1:  # (NaN too)
        raise UserError(f"calib.experts_ratio={ratio}: the share of a layer's routed experts each token reaches for "
                        "statistics must be above 0 and at most 1",
                        fix="set calib.experts_ratio in (0, 1] (1: every expert), or drop it for plain top-k")


def _check_eval(cfg: Any) -> None:
    if not eval_enabled(cfg):
        return
    if cfg.eval.num_samples < 1:
        raise UserError(f"eval.num_samples={cfg.eval.num_samples}: evaluation needs at least 1 held-out sample",
                        fix="set eval.num_samples to 1 or more, or eval.enabled=false")
    if cfg.data.seq_len < 2:
        raise UserError(f"data.seq_len={cfg.data.seq_len}: evaluation scores next-token predictions, which need 2 "
                        "or more tokens a sample", fix="set data.seq_len to 2 or more, or eval.enabled=false")
