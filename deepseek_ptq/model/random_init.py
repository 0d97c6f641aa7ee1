"""Random weights made directly on the model's device: the 671B geometry without a checkpoint on disk.

Drawn like the seeded tiny checkpoint (model/generate.py), but on the device and straight into the
parameters, in the released format: FP8 codes with float32 128x128 block scales, so that the real weight
(code x scale) is about N(0, 1/in_features), with a log-normal spread of the block scales. Norm weights are
near 1, the embedding N(0, 1), the gate bias small: activations stay O(1) through the layers and routing
is roughly balanced, as in a trained model. Reproducible for a seed on one device type and torch version.
"""

from __future__ import annotations

import torch
from torch import nn

from deepseek_ptq.model.parallel import Linear

_FP8_MAX = 448.0
_CODE_STD = 64.0  # codes ~ N(0, 64): well inside e4m3's range, rarely clamped


@torch.no_grad()
def init_random_(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter of ``model`` (on whatever device it lives) with seeded random values."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    owners = {id(m.weight): m for m in model.modules() if isinstance(m, Linear)}
    for name, param in model.named_parameters():
        if name.endswith(".scale"):
            continue  # drawn with its weight
        linear = owners.get(id(param))
        if linear is not None and linear.scale is not None:
            _fp8_weight_(linear, gen)
        elif name.endswith("norm.weight"):
            param.copy_(1.0 + 0.1 * _randn(param, gen))
        elif name.endswith("gate.bias"):
            param.copy_(0.05 * _randn(param, gen))
        elif name.endswith("embed.weight"):
            param.copy_(_randn(param, gen))
        else:
            param.copy_(_randn(param, gen) * param.shape[-1] ** -0.5)


def _randn(param: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    dtype = param.dtype if param.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16
    return torch.randn(param.shape, generator=gen, device=param.device, dtype=dtype)


def _fp8_weight_(linear: Linear, gen: torch.Generator) -> None:
    codes = torch.randn(linear.weight.shape, generator=gen, device=linear.weight.device, dtype=torch.bfloat16)
    linear.weight.copy_(codes.mul_(_CODE_STD).clamp_(-_FP8_MAX, _FP8_MAX))
    spread = torch.randn(linear.scale.shape, generator=gen, device=linear.scale.device).mul_(0.25).exp_()
    linear.scale.copy_(spread * (linear.in_features ** -0.5 / _CODE_STD))
