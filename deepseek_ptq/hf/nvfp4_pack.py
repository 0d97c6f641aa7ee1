"""Real (packed) NVFP4 and FP8 weights from a weight and its calibrated amax, as serving engines load them.

NVFP4 goes through modelopt's own ``NVFP4QTensor`` (the code its Hugging Face export uses): two E2M1 codes
per uint8 (even element in the low nibble), one float8_e4m3fn scale per 16 elements, and the per-tensor
``weight_scale_2 = amax / (6 * 448)``. The activation scale is ``input_scale = amax / (6 * 448)``.
FP8 per-tensor: codes rounded exactly as modelopt's fake quantization rounds them (x * 448 / amax, clamped,
cast), with ``weight_scale = input_scale = amax / 448``, the value engines multiply back.
"""

from __future__ import annotations

import torch
from modelopt.torch.quantization.qtensor import NVFP4QTensor

E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_BLOCK = 16


def _host_divide(amax: torch.Tensor, divisor: float) -> torch.Tensor:
    """max(amax) / divisor in float32, shape [], on amax's device, computed on the host: CUDA divides by a Python
    number as a multiply by its reciprocal, 1 ulp off for some amax (seen on an H200), and an exported scale must
    not depend on the device that packed it."""
    return (amax.detach().float().amax().cpu() / divisor).reshape(()).to(amax.device)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """weight_scale_2 / input_scale of an NVFP4 tensor: its amax over (6 x 448), float32, shape []."""
    return _host_divide(amax, E2M1_MAX * E4M3_MAX)


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """weight_scale / input_scale of an FP8 per-tensor tensor: amax / 448, float32, shape []."""
    return _host_divide(amax, E4M3_MAX)


def pack_nvfp4(weight: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [out, in/2], weight_scale float8_e4m3fn [out, in/16], weight_scale_2 float32 [])."""
    scale_2 = nvfp4_global_scale(amax)
    qtensor, block_scale, scale_2 = NVFP4QTensor.quantize(weight, NVFP4_BLOCK, None, scale_2, try_tensorrt=False)
    return qtensor._quantized_data, block_scale, scale_2.reshape(())


def pack_nvfp4_static(weight: torch.Tensor, block_amax: torch.Tensor, global_amax: torch.Tensor,
                      fp8_max: float = E4M3_MAX) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same three tensors for static block scales (one calibrated amax per 16-block: MSE, local Hessian,
    four-over-six), decoding to modelopt's static fake quantization of ``weight`` bit for bit.

    The block scale the fake quantization multiplies is ``code x inv``: ``code`` the float8_e4m3fn rounding of
    ``block_amax / 6 x (448 / s)`` and ``inv = 1 / (448 / s)``, s = ``global_amax x (448 / fp8_max) / 6`` (the steps
    of modelopt's ``scaled_e4m3_impl`` on the CPU); so ``weight_scale`` is ``code`` and ``weight_scale_2`` is
    ``inv`` (within an ulp of ``global_amax / (6 x fp8_max)``). A block whose code is 0 is all zeros, code 0."""
    from deepseek_ptq.quant.nvfp4_static_cpu import block_scales

    out_f, in_f = weight.shape
    amax = block_amax.detach().float().reshape(out_f, in_f // NVFP4_BLOCK)
    scale_amax = global_amax.detach().float().reshape(()) * (E4M3_MAX / fp8_max) / E2M1_MAX
    multiplier = E4M3_MAX / torch.where(scale_amax <= 1.0 / (1 << 24), torch.ones_like(scale_amax), scale_amax)
    inv = 1 / multiplier
    codes = ((amax / E2M1_MAX) * multiplier).clamp(min=-E4M3_MAX, max=E4M3_MAX).to(torch.float8_e4m3fn)
    if not torch.equal(codes.float() * inv, block_scales(block_amax, global_amax, True, fp8_max).reshape(amax.shape)):
        raise RuntimeError("static NVFP4 block scales differ from modelopt's scaled_e4m3_impl: this modelopt "
                           "version rounds them another way; the export would not be the evaluated model")
    zero = codes.float() == 0
    qtensor, _, _ = NVFP4QTensor.quantize(weight, NVFP4_BLOCK, codes, inv, try_tensorrt=False)
    packed = qtensor._quantized_data.masked_fill(zero.repeat_interleave(NVFP4_BLOCK // 2, dim=-1), 0)
    return packed, codes, inv.reshape(())


def unpack_nvfp4(packed: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor,
                 dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight a serving engine computes with: E2M1 code x (block scale x weight_scale_2), in ``dtype``."""
    shape = torch.Size([packed.shape[0], packed.shape[1] * 2])
    qtensor = NVFP4QTensor(shape, dtype, packed)
    return qtensor.dequantize(dtype=dtype, scale=weight_scale, double_scale=weight_scale_2,
                              block_sizes={-1: NVFP4_BLOCK})


def quantize_fp8(weight: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn codes, weight_scale float32 [])."""
    amax32 = amax.float().amax()
    # The same arithmetic as modelopt's FP8 fake quantization, so the codes are the ones calibration saw.
    codes = (weight.float() * (E4M3_MAX / amax32)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, fp8_scale(amax)
