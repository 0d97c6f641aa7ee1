"""Static-scale NVFP4 fake quantization on any device: the weight format of modelopt's MSE, FP8-sweep,
local-Hessian and four-over-six recipes, where each 16-block keeps its own calibrated amax.

modelopt 0.47 runs it only through a Triton kernel (``static_blockwise_fp4_fake_quant`` in
``modelopt/torch/kernels/quantization/gemm/fp4_kernel.py``; on CPU: "static_blockwise_fp4_fake_quant requires
triton"). Its quantizer (``StaticBlockScaleQuantizer._fake_quantize``) calls that function directly and never
looks at the quant-backend registry that ``nvfp4_cpu`` uses; and a weight quantizer given a backend is left out
of the FP8 sweep and of local-Hessian (``model_calib._make_weight_mse_calibrator``). So ``register`` puts a
dispatcher at the one name that call resolves (``tensor_quantizer.static_blockwise_fp4_fake_quant``): CUDA
tensors with Triton go to modelopt's kernel, unchanged; everything else to ``static_fp4_fake_quant`` here.

The arithmetic is the kernel's, step by step:

* block scales as ``compute_fp4_scales`` makes them, with modelopt's own functions: ``amax / 6`` in float32,
  then (``quantize_block_scales``) FP8-rounded by ``scaled_e4m3_impl`` against
  ``global_amax * (448 / m) / 6`` (m = 448, or 256 for four-over-six; ``global_amax`` None: the max |amax|);
* per element as ``nvfp4_scalar_quant``: ``|x| / scale`` (float32; a zero, NaN or infinite scale divides by 1)
  rounded to the E2M1 magnitudes with the kernel's thresholds (<= 0.25 -> 0, < 0.75 -> 0.5, <= 1.25 -> 1,
  < 1.75 -> 1.5, <= 2.5 -> 2, < 3.5 -> 3, <= 5 -> 4, else 6: ties to even; NaN -> 6), times the scale, the
  sign of ``x >= 0`` (a zero result is +0.0); a block whose scale is 0 gives zeros; cast to ``out_dtype``.

On a GPU the kernel's float32 division is not IEEE's (PTX ``div.full.f32``, within 2 ulp): where ``|x| / scale``
lands within a few ulp of a threshold the kernel can round to the neighbouring E2M1 value. fp32 inputs met none
such on an H100; bf16 and fp16 inputs up to 172 of 131,072 elements (benchmarks/NOTES.md). Bit-exact against the
kernel's arithmetic as Triton 3.6's interpreter runs it (IEEE division; tests/test_nvfp4_static.py).

Block k is elements [k * B, (k + 1) * B) of the flattened input, B = numel / amax.numel(), as in the kernel.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["block_scales", "register", "static_fp4_fake_quant"]

_E2M1_MAX = 6.0
_E4M3_MAX = 448.0


def block_scales(amax: torch.Tensor, global_amax: torch.Tensor | None = None, quantize_block_scales: bool = True,
                 fp8_max_for_normalization: float = _E4M3_MAX) -> torch.Tensor:
    """Per-block scales (float32, amax's shape): modelopt's ``compute_fp4_scales``, which ships only inside a
    Triton module, made of the same modelopt functions."""
    from modelopt.torch.quantization.tensor_quant import scaled_e4m3_impl
    from modelopt.torch.quantization.utils import reduce_amax

    amax = amax.float()
    scale = amax / _E2M1_MAX
    if quantize_block_scales:
        if global_amax is None:
            global_amax = reduce_amax(amax, axis=None, keepdims=False, squeeze_scalar=True)
        global_amax = global_amax.float()
        scale_fp8_quant_amax = global_amax * (_E4M3_MAX / fp8_max_for_normalization) / _E2M1_MAX
        scale = scaled_e4m3_impl(scale, scale_fp8_quant_amax)
    return scale


_LOW_BITS = (1 << 22) - 1  # float32 mantissa bits below E2M1's one mantissa bit


def _e2m1_magnitude(a: torch.Tensor) -> torch.Tensor:
    """The kernel's ``fp4_round_magnitude`` of non-negative (or NaN) ``a``: E2M1's grid is spaced 0.5 below 2
    (rounded as 2a, half to even) and is float32 with one mantissa bit from 2 on (rounded by the bits, half to
    even), which gives the kernel's thresholds, ties included; above 6 it saturates, NaN gives 6. Arithmetic only
    (on CPU ``torch.where`` over a large tensor costs ten times the rest)."""
    below = torch.round(torch.clamp(a, max=2.0) * 2.0) * 0.5
    bits = torch.clamp(a, min=2.0).view(torch.int32)
    bits = (bits + (_LOW_BITS >> 1) + ((bits >> 22) & 1)) & ~_LOW_BITS
    above = bits.view(torch.float32)
    return torch.nan_to_num((below + above) - 2.0, nan=_E2M1_MAX).clamp_(max=_E2M1_MAX)


def _qdq(x: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    n_blocks = scale.numel()
    xf = x.contiguous().view(-1).float().view(n_blocks, -1)
    s = scale.contiguous().view(n_blocks, 1).float()
    zero = s == 0.0
    safe = torch.where(zero | torch.isnan(s) | torch.isinf(s), torch.ones_like(s), s)
    q = _e2m1_magnitude(xf.abs() / safe) * safe
    # The kernel's where(x >= 0, q, -q): the sign bit set for x < 0 and NaN, not for -0.0, and not where q is
    # 0 (Triton negates as 0 - q: +0.0, on an H100 and in Triton 3.6's interpreter alike).
    negative = (torch.logical_not(xf >= 0) & (q != 0)).view(torch.uint8).to(torch.int32) << 31
    out = (q.view(torch.int32) | negative).view(torch.float32)
    if bool(zero.any()):  # a block whose scale is 0 is all +0.0
        out = out.masked_fill(zero, 0.0)
    return out.to(out_dtype).view(x.shape)


class _StaticQDQ(torch.autograd.Function):
    """Identity gradient (post-training quantization never backpropagates through it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return _qdq(x, scale, out_dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


def static_fp4_fake_quant(x: torch.Tensor, amax: torch.Tensor, global_amax: torch.Tensor | None = None,
                          quantize_block_scales: bool = True, fp8_max_for_normalization: float = _E4M3_MAX,
                          out_dtype: torch.dtype | None = None, pass_through_bwd: bool = False) -> torch.Tensor:
    """NVFP4 quantize-dequantize of ``x`` with one calibrated amax per block (the kernel's signature).

    Args:
        x: bf16, fp16 or fp32, any shape; its flattened elements form ``amax.numel()`` equal blocks.
        amax: per-block amax, any shape.
        global_amax: the per-tensor amax the FP8 block scales are quantized against (None: max |amax|).
        quantize_block_scales: FP8-round the block scales (NVFP4) or keep them in float32.
        fp8_max_for_normalization: 448, or 256 for four-over-six.
        out_dtype: the result's dtype (None: ``x``'s).
        pass_through_bwd: accepted for the kernel's signature; the gradient is the identity either way.
    """
    n_blocks = amax.numel()
    if n_blocks == 0 or x.numel() % n_blocks != 0:
        raise ValueError(f"x.numel() ({x.numel()}) is not divisible by amax.numel() ({n_blocks}); "
                         "they must satisfy x.numel() == NUM_FP4_BLOCKS * BLOCK_SIZE.")
    scale = block_scales(amax, global_amax, quantize_block_scales, fp8_max_for_normalization)
    return _StaticQDQ.apply(x, scale, out_dtype or x.dtype)


def _kernel_serves(x: torch.Tensor) -> bool:
    from modelopt.torch.kernels.quantization import gemm

    return x.is_cuda and gemm.IS_AVAILABLE


def _make_dispatch(kernel: Any) -> Any:
    def static_blockwise_fp4_fake_quant(x: torch.Tensor, *args: Any) -> torch.Tensor:
        """modelopt's kernel for CUDA tensors when Triton is there, ``static_fp4_fake_quant`` otherwise."""
        return kernel(x, *args) if _kernel_serves(x) else static_fp4_fake_quant(x, *args)

    static_blockwise_fp4_fake_quant.modelopt_kernel = kernel
    return static_blockwise_fp4_fake_quant


@functools.cache
def register() -> None:
    """Put the dispatcher where modelopt's static quantizer looks the function up (once per process)."""
    from modelopt.torch.quantization.nn.modules import tensor_quantizer

    tensor_quantizer.static_blockwise_fp4_fake_quant = _make_dispatch(tensor_quantizer.static_blockwise_fp4_fake_quant)
