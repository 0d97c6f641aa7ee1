"""Device-agnostic NVFP4 fake quantization, plugged into modelopt as a quant backend.

modelopt's NVFP4 dynamic-block fake quant only runs through CUDA/Triton kernels
("amax must be a CUDA tensor for dynamic block quantization"), so CPU calibration
and evaluation runs fail at the first forward. This module reimplements the same
arithmetic in plain torch and registers it via modelopt's official
``register_quant_backend`` hook; configs opt in with ``"backend": BACKEND_NAME``.

The numerics mirror ``NVFP4QTensor.quantize`` + ``dequantize`` (the path used for
the real NVFP4 export) bit for bit:

* global scale ``gs = amax / (6 * 448)`` in float32 (non-scalar amax is reduced to
  its max first, as modelopt's dynamic block op does);
* per 16-block scale ``block_amax / (6 * gs)``; an all-zero block gets 1.0, then the
  scale is clamped to ``[2**-9, 448]`` and cast to float8_e4m3fn (round-to-nearest-even);
* ``|x| / (scale_fp8 * gs)`` rounded to the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6}
  with ties to even (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4),
  saturating at 6;
* dequantized as ``q * (scale_fp8 * gs)`` in float32, then cast to the input dtype;
* a last dim that is not a multiple of the block size is zero-padded per row
  (like ``reduce_block_padding`` and the Triton kernel's zero boundary fill), then cropped.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
    is_registered_quant_backend,
    register_quant_backend,
)

__all__ = ["BACKEND_NAME", "nvfp4_fake_quant", "register", "use_cpu_backend"]

BACKEND_NAME = "nvfp4_cpu"

_E2M1_MAX = 6.0  # largest FP4 E2M1 magnitude
_E4M3_MAX = 448.0  # largest float8_e4m3fn magnitude
_E4M3_MIN_SUBNORMAL = 2.0**-9  # modelopt clamps block scales here so they never underflow to 0
_NVFP4_NUM_BITS = (2, 1)
_NVFP4_SCALE_BITS = (4, 3)


def _round_to_e2m1(a: torch.Tensor) -> torch.Tensor:
    """Round non-negative ``a`` to the E2M1 magnitude grid, ties to even, saturating at 6.

    The grid spacing is 0.5 below 2, 1 in [2, 4) and 2 from 4 on; torch.round is
    round-half-to-even, so scaling by the spacing (exact powers of two) reproduces
    modelopt's bound table including its tie rules, without an int64 index tensor.
    """
    fine = torch.round(a * 2.0) * 0.5
    mid = torch.round(a)
    coarse = torch.round(a * 0.5) * 2.0
    q = torch.where(a < 2.0, fine, torch.where(a < 4.0, mid, coarse))
    return q.clamp_(max=_E2M1_MAX)


def _qdq(x: torch.Tensor, amax: torch.Tensor, block_size: int) -> torch.Tensor:
    shape, dtype = x.shape, x.dtype
    xf = x.float().reshape(-1, shape[-1] if x.dim() > 0 else 1)
    n = xf.shape[-1]
    pad = (-n) % block_size
    if pad:
        xf = F.pad(xf, (0, pad))
    blocks = xf.view(xf.shape[0], -1, block_size)

    global_amax = amax.detach().to(device=x.device, dtype=torch.float32).amax()
    global_scale = global_amax / (_E2M1_MAX * _E4M3_MAX)
    # Keep the math finite for amax == 0 and zero the result at the end (no host sync);
    # a NaN amax still propagates so broken calibration stays visible.
    valid = global_scale != 0
    gs = torch.where(valid, global_scale, torch.ones_like(global_scale))

    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = block_amax / (_E2M1_MAX * gs)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # modelopt: zero block -> 1.0
    scale = scale.clamp(min=_E4M3_MIN_SUBNORMAL, max=_E4M3_MAX).to(torch.float8_e4m3fn)
    scale = scale.float() * gs

    scaled = blocks / scale
    q = _round_to_e2m1(scaled.abs())
    out = torch.where(scaled < 0, -q, q) * scale
    out = torch.where(valid, out, torch.zeros_like(out))

    out = out.view(xf.shape)
    if pad:
        out = out[:, :n]
    return out.to(dtype).reshape(shape)


class _PassThroughQDQ(torch.autograd.Function):
    """Identity gradient, like modelopt's default ``pass_through_bwd=True``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, amax: torch.Tensor, block_size: int) -> torch.Tensor:
        return _qdq(x, amax, block_size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


def nvfp4_fake_quant(x: torch.Tensor, amax: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """NVFP4 quantize-dequantize ``x`` along its last dim, on any device.

    Args:
        x: Tensor of any shape; bf16, fp16 or fp32.
        amax: Global (per-tensor) amax; a non-scalar amax is reduced to its max.
        block_size: Elements sharing one FP8 scale (16 for NVFP4).

    Returns:
        Tensor with the shape and dtype of ``x``. A zero global amax gives all zeros
        (the saturation limit ``amax`` shrinks to 0) instead of NaNs. Gradients pass
        straight through to ``x``.
    """
    if x.numel() == 0:  # modelopt's forward returns empty inputs untouched too
        return x
    return _PassThroughQDQ.apply(x, amax, block_size)


def _as_tuple(v: Any) -> Any:
    # YAML-loaded configs may carry lists where modelopt's presets use tuples.
    return tuple(v) if isinstance(v, list) else v


def _is_nvfp4_dynamic(num_bits: Any, block_sizes: Any) -> bool:
    return (
        _as_tuple(num_bits) == _NVFP4_NUM_BITS
        and isinstance(block_sizes, dict)
        and block_sizes.get("type") == "dynamic"
        and _as_tuple(block_sizes.get("scale_bits")) == _NVFP4_SCALE_BITS
    )


def _entrypoint(inputs: torch.Tensor, quantizer: Any) -> torch.Tensor:
    """modelopt backend entrypoint: replaces ``TensorQuantizer._fake_quantize``."""
    block_sizes = quantizer.block_sizes
    if not _is_nvfp4_dynamic(quantizer.num_bits, block_sizes):
        raise NotImplementedError(
            f"{BACKEND_NAME} only implements NVFP4 dynamic block quantization, got "
            f"num_bits={quantizer.num_bits}, block_sizes={block_sizes}"
        )
    block_size = block_sizes.get(-1) or block_sizes.get(inputs.dim() - 1)
    if block_size is None:
        raise ValueError("block size for dynamic quantization not found.")
    # Same source as modelopt: calibrated _amax if present, else dynamic from the input.
    amax = quantizer._get_amax(inputs)
    return nvfp4_fake_quant(inputs, amax, block_size=block_size)


def register() -> None:
    """Register the backend with modelopt; safe to call repeatedly (no overwrite warning)."""
    if not is_registered_quant_backend(BACKEND_NAME):
        register_quant_backend(BACKEND_NAME, _entrypoint)


def _with_backend(cfg: Any) -> Any:
    if isinstance(cfg, list):  # SequentialQuantizer configs: one attribute dict per stage
        return [_with_backend(c) for c in cfg]
    if isinstance(cfg, dict) and _is_nvfp4_dynamic(cfg.get("num_bits"), cfg.get("block_sizes")):
        cfg["backend"] = BACKEND_NAME
    return cfg


def use_cpu_backend(quantizer_cfg: dict) -> dict:
    """Return a deep copy of a modelopt quant config with NVFP4 quantizers on this backend.

    Only entries whose ``cfg`` is NVFP4 dynamic block quantization are changed;
    calibration (e.g. ``algorithm="max"``) is unaffected, since the backend only
    replaces the fake-quant function. Also registers the backend.
    """
    register()
    new_cfg = copy.deepcopy(quantizer_cfg)
    for entry in new_cfg.get("quant_cfg", []):
        if isinstance(entry, dict) and "cfg" in entry:
            entry["cfg"] = _with_backend(entry["cfg"])
    return new_cfg
