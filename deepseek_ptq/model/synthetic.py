"""Seeded synthetic weights, one rule for the generated checkpoints (tiny_random) and the on-device draw (ds_v3_slice).

Every weight is drawn in float32 and stored as the release format stores it (model.checkpoint.release_tensor):
Linear and gate weights N(0, 1/fan_in) (fan_in: the full model's in-features, also on a row-parallel shard),
the embedding N(0, 1), norm weights 1 + 0.1 N(0, 1), the gate bias and a LayerNorm bias 0.05 N(0, 1); an FP8 weight becomes codes
with 128x128 block scales. Activations stay O(1) through the layers and routing is roughly balanced.
Reproducible for a seed on one device type and torch version. Each part of the model (the embedding, each
layer, the final norm and head) draws from its own stream, seeded by (seed, part name), so that a layer drawn
alone (layer-streamed calibration) equals the same layer drawn with the whole model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.checkpoint import release_tensor
from deepseek_ptq.model.parallel import Linear
from deepseek_ptq.model.transformer import Transformer

RULE = 3  # the rule's version, part of the generated cache key: bump it whenever a draw changes


def part_of(name: str) -> str:
    """The part a parameter belongs to: ``layers.<i>`` for a block's, else its top-level module."""
    head, _, rest = name.partition(".")
    return f"{head}.{rest.partition('.')[0]}" if head == "layers" else head


def part_seed(seed: int, part: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{part}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def init_random_(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter of ``model`` (on whatever device it lives) with values drawn from ``seed``.

    Names are the full model's (``layers.3.attn.wq.weight``): a holder of one layer under its resident name
    draws exactly what the whole model draws for that layer."""
    device = next(model.parameters()).device
    generators: dict[str, torch.Generator] = {}
    fan_in = {id(m.weight): m.in_features * (m.par.world_size if m.kind == "row" else 1)
              for m in model.modules() if isinstance(m, Linear)}
    params = dict(model.named_parameters())
    for name, param in params.items():
        if name.endswith(".scale"):
            continue  # written with its weight
        part = part_of(name)
        if part not in generators:
            generators[part] = torch.Generator(device=device).manual_seed(part_seed(seed, part))
        value = torch.randn(param.shape, generator=generators[part], device=device, dtype=torch.float32)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * value
        elif name.endswith("gate.bias") or name.endswith("norm.bias"):  # norm.bias: the V3.2 indexer's k_norm
            value = 0.05 * value
        elif not name.endswith("embed.weight"):
            value = value * fan_in.get(id(param), param.shape[-1]) ** -0.5
        for key, tensor in release_tensor(name, value, param.dtype).items():
            params[key].copy_(tensor)


def random_full_state(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter of the unsharded model on the CPU, drawn from ``seed`` (sharded, every W holds this model)."""
    model = Transformer(args)
    init_random_(model, seed)
    return model.state_dict()


def generated_dir(args: ModelArgs, seed: int, cache_root: Path) -> Path:
    digest = hashlib.sha256(json.dumps([args.to_dict(), seed, RULE], sort_keys=True).encode()).hexdigest()[:12]
    return cache_root / f"generated-{digest}"
