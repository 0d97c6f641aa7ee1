"""Triton kernels for DeepSeek FP8 block-scaled weights (imported only on CUDA).

Format: weight [out, in] float8_e4m3fn, scale float32 [ceil(out/128), ceil(in/128)];
real = code * scale of the code's 128x128 block. Every kernel computes exactly what
``kernels.dequant_torch`` computes: ``code.float() * scale`` in float32, then one rounding to the
output dtype, so results are bit-identical.

Layout of the work: each program takes a tile of BM rows x NB*128 columns, viewed as a 4-D block
[128 // VEC, NB, BM, VEC] (run index, scale block, row, code in run) so that the tile's NB scales
are loaded once as a vector and broadcast (BM divides 128, so a tile never straddles two scale
rows). A warp covers contiguous runs of one row; with VEC=8 each thread does 8-byte loads and
16-byte bf16 stores in one register layout (no shared memory). Programs walk the columns fastest,
so neighbouring programs touch neighbouring memory. Stacks of experts use the grid's second axis.
The amax variants reduce |value| per tile (in float32, rounded once) and fold the tile maxima
into one float32 with an integer atomic max on the float's bits (valid because the values are
non-negative).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

BLOCK = 128

# Default tiles: BM rows x NB*128 columns, run length VEC, num_warps. Chosen from
# scripts/bench_dequant.py's sweep over the lists below on an H200 (see benchmarks/NOTES.md).
DEFAULT_CONFIG = {"BM": 32, "NB": 4, "VEC": 8, "num_warps": 4}
AMAX_ONLY_CONFIG = {"BM": 32, "NB": 4, "VEC": 16, "num_warps": 4}

# Candidates the benchmark sweeps and the GPU tests check for exactness.
TUNING_CONFIGS = [
    {"BM": bm, "NB": nb, "VEC": vec, "num_warps": w}
    for bm, nb, vec, w in [
        (8, 4, 8, 4), (16, 2, 8, 4), (16, 4, 8, 4), (16, 8, 8, 4), (32, 1, 8, 4), (32, 2, 8, 4),
        (32, 4, 8, 4), (32, 4, 8, 8), (32, 8, 8, 8), (64, 1, 8, 4), (64, 2, 8, 4), (64, 2, 8, 8),
        (64, 4, 8, 8), (128, 1, 8, 8), (128, 2, 8, 8), (128, 4, 8, 8), (32, 4, 16, 4), (64, 2, 16, 8),
    ]
]
AMAX_ONLY_TUNING_CONFIGS = [
    {"BM": bm, "NB": nb, "VEC": vec, "num_warps": w}
    for bm, nb, vec, w in [
        (16, 4, 16, 4), (32, 4, 16, 4), (32, 8, 16, 8), (64, 4, 16, 8), (128, 2, 16, 8), (128, 4, 16, 8),
        (32, 4, 8, 4), (64, 8, 16, 8),
    ]
]

_TL_DTYPES = {
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float32: tl.float32,
}


@triton.jit
def _fp8_dequant_kernel(
    w_ptr, s_ptr, out_ptr, amax_ptr,
    M, N, n_col_tiles,
    stride_we, stride_wm,
    stride_se, stride_sm,
    stride_oe, stride_om,
    BM: tl.constexpr, NB: tl.constexpr, VEC: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    WRITE_OUT: tl.constexpr, AMAX: tl.constexpr, ROUND_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    expert = tl.program_id(1).to(tl.int64)
    tile_m = pid // n_col_tiles
    tile_n = pid % n_col_tiles
    r0 = tile_m * BM
    c0 = tile_n * (NB * 128)

    # Scalar 64-bit base pointers; the offsets inside the tile stay 32-bit.
    w_base = w_ptr + expert * stride_we + r0.to(tl.int64) * stride_wm + c0
    s_base = s_ptr + expert * stride_se + (r0 // 128).to(tl.int64) * stride_sm + tile_n * NB

    # 4-D tile [128 // VEC, NB, BM, VEC]: each 128-column scale block split into runs of VEC
    # contiguous codes. Triton orders a blocked layout's dimensions by contiguity, ties going to
    # the lower index, so after the run (dim 3) come the run index (dim 0), then the scale block
    # (dim 1), then the row (dim 2): neighbouring threads take neighbouring runs of one row, and a
    # warp covers 256 (VEC=8) or 512 (VEC=16) contiguous codes. (With rows before runs, a warp
    # touched 32 rows at 8 bytes each and ran 2.5x slower.) With VEC=8 the fp8 load and the bf16
    # store get one layout (8 elements a thread: 8-byte loads, 16-byte stores), so no
    # shared-memory layout conversion sits between them; the amax-only kernel, which stores
    # nothing, can use VEC=16 (16-byte loads).
    offs_v = tl.arange(0, 128 // VEC)[:, None, None, None]
    offs_b = tl.arange(0, NB)[None, :, None, None]
    offs_r = tl.arange(0, BM)[None, None, :, None]
    offs_e = tl.arange(0, VEC)[None, None, None, :]
    col = offs_b * 128 + offs_v * VEC + offs_e  # [128 // VEC, NB, 1, VEC], column inside the tile

    w_offs = offs_r * stride_wm + col
    sb = tl.arange(0, NB)
    if EVEN_N:
        s = tl.load(s_base + sb)
    else:
        s = tl.load(s_base + sb, mask=(c0 + sb * 128) < N, other=0.0)
    s = s[None, :, None, None]  # [1, NB, 1, 1]

    if EVEN_M and EVEN_N:
        w = tl.load(w_base + w_offs)
    else:
        mask = ((r0 + offs_r) < M) & ((c0 + col) < N)
        w = tl.load(w_base + w_offs, mask=mask, other=0.0)

    y = w.to(tl.float32) * s  # same float32 product as the torch reference

    if WRITE_OUT:
        o_base = out_ptr + expert * stride_oe + r0.to(tl.int64) * stride_om + c0
        o_offs = offs_r * stride_om + col
        if EVEN_M and EVEN_N:
            tl.store(o_base + o_offs, y.to(out_ptr.dtype.element_ty))
        else:
            tl.store(o_base + o_offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    if AMAX:
        # Max of |y| in float32, rounded once at the end: round-to-nearest-even is monotone and
        # odd, so round(max|y|) == max|round(y)|, the amax of the values as stored.
        tile_max = tl.max(tl.max(tl.max(tl.max(tl.abs(y), axis=3), axis=2), axis=1), axis=0)
        if WRITE_OUT:
            tile_max = tile_max.to(out_ptr.dtype.element_ty).to(tl.float32)
        else:
            tile_max = tile_max.to(ROUND_DTYPE).to(tl.float32)
        # Non-negative floats order like their int32 bit patterns (NaN bits sort above inf).
        tl.atomic_max(amax_ptr, tile_max.to(tl.int32, bitcast=True), sem="relaxed")


def _check(weight: torch.Tensor, scale: torch.Tensor, batched: bool) -> tuple[torch.Tensor, torch.Tensor]:
    nd = 3 if batched else 2
    if weight.dim() != nd or scale.dim() != nd:
        raise ValueError(f"expected {nd}-D weight and scale, got {tuple(weight.shape)} and {tuple(scale.shape)}")
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"weight must be float8_e4m3fn, got {weight.dtype}")
    if not weight.is_cuda or scale.device != weight.device:
        raise ValueError("weight and scale must be on the same CUDA device")
    out_f, in_f = weight.shape[-2:]
    want = (-(-out_f // BLOCK), -(-in_f // BLOCK))
    if tuple(scale.shape[-2:]) != want or (batched and scale.shape[0] != weight.shape[0]):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match weight {tuple(weight.shape)}")
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if scale.dtype != torch.float32:
        scale = scale.float()  # exact: the reference multiplies in float32 too
    if scale.stride(-1) != 1:
        scale = scale.contiguous()
    return weight, scale


def _launch(weight, scale, out, amax, *, write_out, want_amax, round_dtype, config):
    """weight/scale/out are 3-D [E, M, N] views. Returns the compiled kernel (None if nothing ran)."""
    cfg = dict(DEFAULT_CONFIG if config is None else config)
    bm, nb, vec, warps = cfg["BM"], cfg["NB"], cfg.get("VEC", 8), cfg["num_warps"]
    if BLOCK % bm:
        raise ValueError("BM must divide 128")
    num_e, m, n = weight.shape
    if num_e == 0 or m == 0 or n == 0:
        return None
    tile_n = nb * BLOCK
    n_col_tiles = triton.cdiv(n, tile_n)
    n_row_tiles = triton.cdiv(m, bm)
    if num_e > 65535:
        raise ValueError("at most 65535 experts per launch")
    grid = (n_row_tiles * n_col_tiles, num_e)
    out_arg = out if out is not None else weight  # unused when WRITE_OUT is false
    return _fp8_dequant_kernel[grid](
        weight, scale, out_arg, amax if amax is not None else scale,
        m, n, n_col_tiles,
        weight.stride(0), weight.stride(1),
        scale.stride(0), scale.stride(1),
        out_arg.stride(0), out_arg.stride(1),
        BM=bm, NB=nb, VEC=vec,
        EVEN_M=(m % bm == 0), EVEN_N=(n % tile_n == 0),
        WRITE_OUT=write_out, AMAX=want_amax, ROUND_DTYPE=round_dtype,
        num_warps=warps,
    )


def _new_out(weight: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    if dtype not in _TL_DTYPES:
        raise TypeError(f"unsupported output dtype {dtype}")
    if out is None:
        return torch.empty(weight.shape, dtype=dtype, device=weight.device)
    if out.shape != weight.shape or out.dtype != dtype or out.device != weight.device or out.stride(-1) != 1:
        raise ValueError("out must match weight's shape, the dtype, the device and have unit last stride")
    return out


def _amax_buffer(device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


def _amax_value(buf: torch.Tensor) -> torch.Tensor:
    return buf.view(torch.float32).reshape(())


def fp8_block_dequant(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *,
                      out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """Dequantize a [out, in] FP8 weight with its block scales; bit-identical to ``dequant_torch``."""
    weight, scale = _check(weight, scale, batched=False)
    out = _new_out(weight, dtype, out)
    _launch(weight[None], scale[None], out[None], None, write_out=True, want_amax=False,
            round_dtype=tl.float32, config=config)
    return out


def fp8_block_dequant_amax(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *,
                           out: torch.Tensor | None = None,
                           config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize and return (weight in ``dtype``, max |weight| as a float32 0-dim tensor) in one pass.

    The amax is taken over the values as rounded to ``dtype``, i.e. it equals
    ``dequant_torch(weight, scale, dtype).float().abs().max()``.
    """
    weight, scale = _check(weight, scale, batched=False)
    out = _new_out(weight, dtype, out)
    buf = _amax_buffer(weight.device)
    _launch(weight[None], scale[None], out[None], buf, write_out=True, want_amax=True,
            round_dtype=tl.float32, config=config)
    return out, _amax_value(buf)


def fp8_block_amax(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, *,
                   config: dict | None = None) -> torch.Tensor:
    """max |code * scale| without writing the dequantized weight (reads 1 byte per element).

    With the default ``dtype=float32`` this is the exact max of the real weight; with another dtype
    it is the max of the values as rounded to that dtype (what ``fp8_block_dequant_amax`` returns).
    """
    weight, scale = _check(weight, scale, batched=False)
    if dtype not in _TL_DTYPES:
        raise TypeError(f"unsupported dtype {dtype}")
    buf = _amax_buffer(weight.device)
    _launch(weight[None], scale[None], None, buf, write_out=False, want_amax=True,
            round_dtype=_TL_DTYPES[dtype], config=config if config is not None else AMAX_ONLY_CONFIG)
    return _amax_value(buf)


def batched_fp8_block_dequant(weights: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *,
                              out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """Dequantize a stack of experts [E, out, in] with scales [E, ceil(out/128), ceil(in/128)] in one launch."""
    weights, scales = _check(weights, scales, batched=True)
    out = _new_out(weights, dtype, out)
    _launch(weights, scales, out, None, write_out=True, want_amax=False,
            round_dtype=tl.float32, config=config)
    return out


# ------------------------------------------------------------------------------------------------------------
# MoE combine: each token's weighted expert outputs, summed in a fixed order with one bf16 rounding per step.


@triton.jit
def _round_to_bf16(x):
    """x (float32) rounded to the nearest bfloat16, ties to even, returned as float32. Integer ops on the bits
    (the rounding torch's BFloat16 uses): a float32 -> bf16 -> float32 round trip written with casts was not
    kept by the compiler on an H200 (the sums came out rounded once, not per step: benchmarks/NOTES.md).
    Finite values only: a NaN may come out as inf (still non-finite, which calibration refuses)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _moe_combine_kernel(out_ptr, pos_ptr, w_ptr, y_ptr, D, stride_out, stride_y,
                        K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        p = tl.load(pos_ptr + t * K + j).to(tl.int64)
        w = tl.load(w_ptr + t * K + j).to(tl.float32)
        o = tl.load(out_ptr + p * stride_out + cols, mask=cmask & (p >= 0), other=0.0).to(tl.float32)
        # torch's bf16 ops: the product rounded to bf16 (exact in float32 first), then the running sum rounded
        # to bf16 after each add (a float32 sum of two bf16 values rounded once is the correctly rounded sum).
        acc = _round_to_bf16(acc + _round_to_bf16(o * w))
    tl.store(y_ptr + t * stride_y + cols, acc.to(tl.bfloat16), mask=cmask)


def moe_combine(out: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor, block_d: int = 1024) -> torch.Tensor:
    """y[t] = sum over j of bf16(out[pos[t, j]] * weights[t, j]), added in j order from 0 with bf16 rounding
    after each step (pos < 0: nothing added), bit for bit what the same sequence of torch bf16 ops gives."""
    if out.dtype != torch.bfloat16 or weights.dtype != torch.bfloat16 or out.stride(-1) != 1:
        raise ValueError("moe_combine takes bf16 rows with unit column stride and bf16 weights")
    num_tokens, k = pos.shape
    pos, weights = pos.contiguous(), weights.contiguous()
    y = torch.empty(num_tokens, out.shape[1], dtype=out.dtype, device=out.device)
    if num_tokens:
        grid = (num_tokens, triton.cdiv(out.shape[1], block_d))
        _moe_combine_kernel[grid](out, pos, weights, y, out.shape[1], out.stride(0), y.stride(0),
                                  K=k, BLOCK_D=block_d, num_warps=4)
    return y


# ------------------------------------------------------------------------------------------------------------
# SwiGLU amax: max |bf16(silu(a1)) * a3| of two bf16 GEMM outputs, without writing the SwiGLU out (the w2 input
# amax of all-experts calibration, where the w2 GEMM itself is skipped).


@triton.jit
def _swiglu_absmax_kernel(a1_ptr, a3_ptr, out_ptr, rows, cols, stride1, stride3, segment_blocks,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pr = tl.program_id(0)
    r = (pr * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    x = tl.load(a1_ptr + r[:, None] * stride1 + c[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(a3_ptr + r[:, None] * stride3 + c[None, :], mask=mask, other=0.0).to(tl.float32)
    # torch's silu on bf16: x / (1 + exp(-x)) in float32 (CUDA's expf, an IEEE division), rounded to bf16
    s = tl.math.div_rn(x, 1.0 + libdevice.exp(-x))
    s = tl.where(s == s, _round_to_bf16(s), s)  # a NaN stays NaN (the bit rounding could carry it to -0)
    # |s * g| is exact in float32 (two 8-bit significands). Rounding to bf16 is monotone, so the max of the
    # rounded products is the rounded max: the caller rounds once. Non-negative floats order as their bits,
    # and a NaN's bits (sign cleared by abs) sit above inf's: the max propagates NaN as torch's does.
    bits = tl.abs(s * g).to(tl.int32, bitcast=True)
    tl.atomic_max(out_ptr + pr // segment_blocks, tl.max(tl.max(bits, axis=1), axis=0))


def swiglu_absmax(a1: torch.Tensor, a3: torch.Tensor, out: torch.Tensor | None = None,
                  segment_rows: int | None = None, block_rows: int = 8, block_cols: int = 512) -> torch.Tensor:
    """max |silu(a1) * a3| with torch's bf16 rounding (each op's result rounded to bf16), as float32 bits
    (int32) folded into ``out`` by an atomic max; ``out`` starts at 0 (the bits of +0.0), or a new one is made.

    a1, a3: bf16 [rows, cols] with unit column stride (the two halves of one [w1; w3] GEMM output will do).
    ``segment_rows``: a max per ``segment_rows`` consecutive rows (a multiple of ``block_rows``; default: one for
    all), ``out[i]`` taking rows [i * segment_rows, (i + 1) * segment_rows). Read the result as
    ``out.view(torch.float32).to(torch.bfloat16)``: the bf16 value torch's ops give."""
    if a1.dtype != torch.bfloat16 or a3.dtype != torch.bfloat16 or a1.shape != a3.shape or a1.dim() != 2:
        raise ValueError("swiglu_absmax takes two bf16 matrices of one shape")
    if a1.stride(1) != 1 or a3.stride(1) != 1:
        raise ValueError("swiglu_absmax takes matrices with unit column stride")
    rows, cols = a1.shape
    row_blocks = triton.cdiv(rows, block_rows)
    segment_rows = segment_rows or max(row_blocks, 1) * block_rows
    if segment_rows % block_rows:
        raise ValueError(f"segment_rows {segment_rows} is not a multiple of block_rows {block_rows}")
    if out is None:
        out = torch.zeros(triton.cdiv(max(rows, 1), segment_rows), dtype=torch.int32, device=a1.device)
    if rows and cols:
        grid = (row_blocks, triton.cdiv(cols, block_cols))
        _swiglu_absmax_kernel[grid](a1, a3, out, rows, cols, a1.stride(0), a3.stride(0), segment_rows // block_rows,
                                    BLOCK_R=block_rows, BLOCK_C=block_cols, num_warps=8)
    return out
