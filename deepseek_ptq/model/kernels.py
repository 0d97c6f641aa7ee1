"""FP8 block-scaled weight dequantization: a torch path everywhere, a Triton path on CUDA.

DeepSeek stores every Linear weight as float8_e4m3fn with one float32 scale per 128x128 block;
the real weight is code x scale of its block.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 128


def dequant_torch(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                  block: int = BLOCK) -> torch.Tensor:
    """Reference dequantization with plain torch ops (any device)."""
    out_f, in_f = weight.shape
    expanded = scale.repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return (weight.float() * expanded).to(dtype)


@functools.cache
def _triton_available() -> bool:
    try:
        from deepseek_ptq.model import triton_kernels  # noqa: F401
    except Exception:  # ImportError without triton; anything else means a broken install
        return False
    return True


def dequant(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantize an FP8 block-scaled weight, with the Triton kernel where it can run."""
    if weight.is_cuda and _triton_available():
        from deepseek_ptq.model import triton_kernels

        return triton_kernels.fp8_block_dequant(weight, scale, dtype)
    return dequant_torch(weight, scale, dtype)


def quantize_fp8_blocks(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weight -> (float8_e4m3fn codes, float32 block scales), as DeepSeek's release stores it."""
    out_f, in_f = weight.shape
    rows, cols = -(-out_f // block), -(-in_f // block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32, device=weight.device)
    padded[:out_f, :in_f] = weight.float()
    blocks = padded.view(rows, block, cols, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
    codes = (blocks / scale[:, None, :, None]).view(rows * block, cols * block)[:out_f, :in_f]
    return codes.to(torch.float8_e4m3fn), scale
