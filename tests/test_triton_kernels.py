"""GPU tests for deepseek_ptq.model.triton_kernels: bit-identity with kernels.dequant_torch.

Skipped where CUDA or Triton is missing (the CPU CI). Also runnable as
``python tests/test_triton_kernels.py``. Every check draws fresh random FP8 codes (never zero) and
fresh positive scales, and hands the kernels NaN-poisoned outputs so that an unwritten element fails.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

if __name__ == "__main__":  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if not torch.cuda.is_available():
    if __name__ == "__main__":
        print("skipped: needs a CUDA device")
        sys.exit(0)
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from deepseek_ptq.model import kernels  # noqa: E402
from deepseek_ptq.model import triton_kernels as tk  # noqa: E402
from deepseek_ptq.model.kernels import dequant_torch  # noqa: E402

DEV = torch.device("cuda")
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max

SHAPES = [(300, 200), (128, 128), (2048, 7168), (576, 7168), (7168, 2048), (1, 1), (129, 257), (257, 1000)]
def _gen() -> tuple[torch.Generator, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator(device=DEV).manual_seed(seed), seed


def make_fp8(shape, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh random codes (normal, scaled, no zeros) and positive scales spanning a few decades."""
    *lead, out_f, in_f = shape
    f = torch.randn(shape, device=DEV, generator=g) * 64
    f = f.clamp(-FP8_MAX, FP8_MAX)
    f = torch.where(f.abs() < 2.0**-8, torch.ones_like(f), f)  # below this the code would round to 0
    w = f.to(torch.float8_e4m3fn)
    sshape = (*lead, -(-out_f // 128), -(-in_f // 128))
    s = torch.exp(torch.randn(sshape, device=DEV, generator=g) * 2) * 1e-3
    assert bool((w.float() != 0).all()) and bool((s > 0).all())
    return w, s


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, msg: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, msg
    assert not torch.isnan(got).any(), f"unwritten (NaN) elements: {msg}"
    ibits = {1: torch.int8, 2: torch.int16, 4: torch.int32}[got.element_size()]
    diff = (got.contiguous().view(ibits) != want.contiguous().view(ibits))
    assert not diff.any(), f"{int(diff.sum())} elements differ: {msg}"


def ref_amax(w, s, dtype) -> torch.Tensor:
    return dequant_torch(w, s, dtype).float().abs().max()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dequant_bit_identical(shape, dtype):
    g, seed = _gen()
    w, s = make_fp8(shape, g)
    want = dequant_torch(w, s, dtype)
    out = poisoned(shape, dtype)
    got = tk.fp8_block_dequant(w, s, dtype, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_bits_equal(got, want, f"shape={shape} dtype={dtype} seed={seed}")
    assert_bits_equal(tk.fp8_block_dequant(w, s, dtype), want, f"fresh out, seed={seed}")


def _cfg_id(c: dict) -> str:
    return "BM{BM}_NB{NB}_V{VEC}_w{num_warps}".format(**c)


@pytest.mark.parametrize("config", tk.TUNING_CONFIGS, ids=_cfg_id)
def test_dequant_configs(config):
    """Every tile the benchmark may pick stays exact, with both masks active (257 x 1000)."""
    g, seed = _gen()
    w, s = make_fp8((257, 1000), g)
    want = dequant_torch(w, s)
    got = tk.fp8_block_dequant(w, s, out=poisoned(w.shape, torch.bfloat16), config=config)
    assert_bits_equal(got, want, f"config={config} seed={seed}")
    got, amax = tk.fp8_block_dequant_amax(w, s, out=poisoned(w.shape, torch.bfloat16), config=config)
    assert_bits_equal(got, want, f"amax variant config={config} seed={seed}")
    assert amax.item() == want.float().abs().max().item(), f"seed={seed}"


@pytest.mark.parametrize("config", tk.AMAX_ONLY_TUNING_CONFIGS, ids=_cfg_id)
def test_amax_only_configs(config):
    g, seed = _gen()
    w, s = make_fp8((257, 1000), g)
    assert tk.fp8_block_amax(w, s, config=config).item() == ref_amax(w, s, torch.float32).item(), f"seed={seed}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_dequant_amax(shape, dtype):
    g, seed = _gen()
    w, s = make_fp8(shape, g)
    want = dequant_torch(w, s, dtype)
    got, amax = tk.fp8_block_dequant_amax(w, s, dtype, out=poisoned(shape, dtype))
    assert_bits_equal(got, want, f"shape={shape} dtype={dtype} seed={seed}")
    assert amax.dtype == torch.float32 and amax.dim() == 0 and amax.device.type == "cuda"
    assert amax.item() == want.float().abs().max().item(), f"seed={seed}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_amax_only(shape):
    g, seed = _gen()
    w, s = make_fp8(shape, g)
    amax = tk.fp8_block_amax(w, s)
    assert amax.dtype == torch.float32 and amax.dim() == 0
    assert amax.item() == ref_amax(w, s, torch.float32).item(), f"seed={seed}"
    # rounded to bf16 first: the same number fp8_block_dequant_amax reports
    assert tk.fp8_block_amax(w, s, torch.bfloat16).item() == ref_amax(w, s, torch.bfloat16).item(), f"seed={seed}"


@pytest.mark.parametrize("shape", [(5, 300, 200), (3, 576, 7168), (4, 2048, 7168), (2, 7168, 2048), (1, 129, 257)],
                         ids=lambda s: "x".join(map(str, s)))
def test_batched(shape):
    g, seed = _gen()
    w, s = make_fp8(shape, g)
    out = poisoned(shape, torch.bfloat16)
    got = tk.batched_fp8_block_dequant(w, s, out=out)
    assert got.data_ptr() == out.data_ptr()
    for e in range(shape[0]):
        assert_bits_equal(got[e], dequant_torch(w[e], s[e]), f"expert {e} shape={shape} seed={seed}")
    assert_bits_equal(tk.batched_fp8_block_dequant(w, s, torch.float32)[-1], dequant_torch(w[-1], s[-1], torch.float32),
                      f"float32 seed={seed}")


def test_strided_weight_view():
    """A column slice of a wider weight (row stride != in_features) reads the right codes."""
    g, seed = _gen()
    wide, _ = make_fp8((300, 384), g)
    w = wide[:, :200]
    _, s = make_fp8((300, 200), g)
    assert not w.is_contiguous()
    assert_bits_equal(tk.fp8_block_dequant(w, s, out=poisoned((300, 200), torch.bfloat16)),
                      dequant_torch(w, s), f"seed={seed}")


def test_dispatch_uses_triton_and_matches():
    g, seed = _gen()
    w, s = make_fp8((576, 7168), g)
    assert kernels._triton_available()
    assert_bits_equal(kernels.dequant(w, s), dequant_torch(w, s), f"seed={seed}")


def test_rejects_bad_scale_shape():
    g, _ = _gen()
    w, s = make_fp8((300, 200), g)
    with pytest.raises(ValueError):
        tk.fp8_block_dequant(w, s[:, :1])


def test_repeatable():
    """Same inputs, same bits, run after run (a race would move them)."""
    g, seed = _gen()
    w, s = make_fp8((2048, 7168), g)
    first, a1 = tk.fp8_block_dequant_amax(w, s)
    for _ in range(3):
        again, a2 = tk.fp8_block_dequant_amax(w, s, out=poisoned(w.shape, torch.bfloat16))
        assert_bits_equal(again, first, f"seed={seed}")
        assert a1.item() == a2.item()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
