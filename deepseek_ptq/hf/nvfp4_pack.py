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
