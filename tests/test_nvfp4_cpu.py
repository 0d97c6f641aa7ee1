"""CPU NVFP4 backend: bit-exactness vs modelopt's NVFP4QTensor and end-to-end mtq.quantize."""

import copy
import warnings
import zlib

import modelopt.torch.quantization as mtq
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from modelopt.torch.quantization.config import QuantizerAttributeConfig
from modelopt.torch.quantization.nn import TensorQuantizer
from modelopt.torch.quantization.nn.modules.tensor_quantizer import is_registered_quant_backend
from modelopt.torch.quantization.qtensor import NVFP4QTensor

from deepseek_ptq.quant.nvfp4_cpu import (
    BACKEND_NAME,
    nvfp4_fake_quant,
    register,
    use_cpu_backend,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
NVFP4_ATTR = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}


def modelopt_qdq(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Reference: modelopt's NVFP4QTensor quantize + dequantize (zero-pads, then crops)."""
    n = x.shape[-1]
    xp = F.pad(x, (0, (-n) % 16))  # dequantize() cannot reshape padded data back itself
    wsf2 = amax.float() / (6.0 * 448.0)
    qt, scale, double_scale = NVFP4QTensor.quantize(xp, 16, weights_scaling_factor_2=wsf2)
    out = qt.dequantize(dtype=x.dtype, scale=scale, double_scale=double_scale, block_sizes={-1: 16})
    return out[..., :n]


def make_input(
    shape: tuple[int, ...], dtype: torch.dtype, kind: str, gen: torch.Generator
) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    flat = x.view(-1)
    if kind == "outliers":
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 100),), generator=gen)
        flat[idx] *= 500.0
    elif kind == "zero_blocks":
        # every other 16-block all zeros, plus a block of tiny values that would
        # underflow the FP8 block scale (exercises the 2**-9 clamp)
        width = x.shape[-1]
        if width < 16:
            x.zero_()
        else:
            x[..., :16] = 0.0
            if width >= 32:
                x[..., 16:32] = 1e-7 * torch.randn(x[..., 16:32].shape, generator=gen)
    return x.to(dtype)


SHAPES = [(16,), (4, 64), (3, 5, 128), (256, 2048), (7,), (3, 20), (2, 3, 33)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["normal", "outliers", "zero_blocks"])
def test_bit_exact_vs_modelopt(shape, dtype, kind):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, kind)).encode()))
    x = make_input(shape, dtype, kind, gen)
    amaxes = [x.abs().amax().float(), torch.tensor(1.5)]  # 1.5 < max(|x|): saturating
    if x.abs().amax() == 0:
        amaxes = [torch.tensor(1.5)]  # modelopt itself yields NaN for amax == 0
    for amax in amaxes:
        ref = modelopt_qdq(x, amax)
        out = nvfp4_fake_quant(x, amax)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, ref), (amax, (out.float() - ref.float()).abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exp", [0, -3, 4])
def test_rounding_ties(dtype, exp):
    # global amax 6*448*2**exp makes the block scale exactly 2**exp, so every value
    # below sits exactly on a midpoint of the E2M1 grid (ties go to the even code).
    s = 2.0**exp
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    x = torch.tensor([6.0, *ties, *[-t for t in ties], -6.0]) * s
    want = torch.tensor([6.0, *expected, *[-e for e in expected], -6.0]) * s
    x = x.to(dtype).repeat(3, 2)
    amax = torch.tensor(6.0 * 448.0 * s)
    out = nvfp4_fake_quant(x, amax)
    assert torch.equal(out, want.to(dtype).repeat(3, 2))
    assert torch.equal(out, modelopt_qdq(x, amax))


def test_amax_edge_cases():
    x = torch.randn(4, 32)
    # non-scalar amax is reduced to its max, like modelopt's dynamic block op
    assert torch.equal(
        nvfp4_fake_quant(x, torch.tensor([0.5, 2.0])), nvfp4_fake_quant(x, torch.tensor(2.0))
    )
    # amax == 0: all zeros instead of NaN
    assert torch.equal(nvfp4_fake_quant(x, torch.tensor(0.0)), torch.zeros_like(x))
    assert torch.equal(nvfp4_fake_quant(torch.zeros(2, 16), torch.tensor(0.0)), torch.zeros(2, 16))
    empty = torch.zeros(0, 16)
    assert nvfp4_fake_quant(empty, torch.tensor(1.0)).shape == (0, 16)


def test_gradient_passes_through():
    x = torch.randn(2, 32, requires_grad=True)
    nvfp4_fake_quant(x, torch.tensor(3.0)).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_register_is_idempotent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register()
        register()
    assert is_registered_quant_backend(BACKEND_NAME)


def test_use_cpu_backend_rewrites_only_nvfp4_entries():
    fp8 = {"num_bits": (4, 3), "axis": None}
    # lists instead of tuples, as a YAML-loaded config would carry
    yaml_style = {
        "num_bits": [2, 1],
        "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": [4, 3]},
    }
    cfg = {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": copy.deepcopy(NVFP4_ATTR)},
            {"quantizer_name": "*input_quantizer", "cfg": fp8},
            {"quantizer_name": "*seq_quantizer", "cfg": [copy.deepcopy(NVFP4_ATTR), fp8]},
            {"quantizer_name": "*yaml_quantizer", "cfg": yaml_style},
        ],
        "algorithm": "max",
    }
    before = copy.deepcopy(cfg)
    new = use_cpu_backend(cfg)
    assert cfg == before  # input untouched (deep copy)
    entries = new["quant_cfg"]
    assert entries[0] == before["quant_cfg"][0]
    assert entries[1]["cfg"]["backend"] == BACKEND_NAME
    assert "backend" not in entries[2]["cfg"]
    assert entries[3]["cfg"][0]["backend"] == BACKEND_NAME and "backend" not in entries[3]["cfg"][1]
    assert entries[4]["cfg"]["backend"] == BACKEND_NAME
    assert new["algorithm"] == "max"
    # modelopt's pydantic config accepts the key
    assert QuantizerAttributeConfig(**entries[1]["cfg"]).backend == BACKEND_NAME


def test_quantizer_dynamic_amax_uses_input():
    register()
    q = TensorQuantizer(QuantizerAttributeConfig(**NVFP4_ATTR, backend=BACKEND_NAME))
    x = torch.randn(3, 48, dtype=torch.bfloat16)
    assert torch.equal(q(x), nvfp4_fake_quant(x, x.abs().amax()))


def test_mtq_quantize_end_to_end():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    calib = [torch.randn(4, 64) for _ in range(3)]

    def forward_loop(m: nn.Module) -> None:
        for batch in calib:
            m(batch)

    mtq.quantize(model, use_cpu_backend(mtq.NVFP4_DEFAULT_CFG), forward_loop)

    linears = [model[0], model[2]]
    for lin in linears:
        for q in (lin.input_quantizer, lin.weight_quantizer):
            assert q.is_enabled and q.backend == BACKEND_NAME
            assert q.amax is not None and q.amax.numel() == 1 and q.amax > 0
        assert torch.equal(lin.weight_quantizer.amax.reshape(()), lin.weight.detach().abs().amax())
    expected_in_amax = torch.stack([b.abs().amax() for b in calib]).amax()
    assert torch.equal(model[0].input_quantizer.amax.reshape(()), expected_in_amax)

    def manual(lin: nn.Linear, h: torch.Tensor) -> torch.Tensor:
        hq = nvfp4_fake_quant(h, lin.input_quantizer.amax)
        wq = nvfp4_fake_quant(lin.weight, lin.weight_quantizer.amax)
        return F.linear(hq, wq, lin.bias)

    x = torch.randn(5, 64)
    with torch.no_grad():
        out = model(x)
        want = manual(model[2], torch.relu(manual(model[0], x)))
        hidden = torch.relu(F.linear(x, model[0].weight, model[0].bias))
        unquantized = F.linear(hidden, model[2].weight, model[2].bias)
    assert torch.equal(out, want)
    assert not torch.equal(out, unquantized)
