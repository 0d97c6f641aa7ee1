"""Static-scale NVFP4 (quant/nvfp4_static_cpu.py) against modelopt's own code, and the three recipes that use it
(quant=nvfp4_mse, nvfp4_local_hessian, nvfp4_4o6) calibrated, evaluated and exported end to end on the CPU.

The reference on the CPU is modelopt's: the block scales from ``scaled_e4m3_impl`` (what its kernel wrapper's
``compute_fp4_scales`` calls) and the E2M1 rounding of ``NVFP4QTensor`` quantize + dequantize (its CPU-capable
NVFP4 code), blocks whose scale rounds to 0 giving zeros (the kernel's rule). Where Triton is installed, the
kernel itself runs on the CPU under Triton's interpreter and is compared bit for bit too.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
from conftest import make_cfg, run_job
from modelopt.torch.quantization.config import QuantizerAttributeConfig
from modelopt.torch.quantization.nn import StaticBlockScaleQuantizer, TensorQuantizer
from modelopt.torch.quantization.qtensor import NVFP4QTensor
from modelopt.torch.quantization.tensor_quant import scaled_e4m3_impl
from safetensors import safe_open

from deepseek_ptq.errors import UserError
from deepseek_ptq.hf.export import export_run
from deepseek_ptq.quant import nvfp4_static_cpu
from deepseek_ptq.quant.nvfp4_static_cpu import static_fp4_fake_quant

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def modelopt_reference(x: torch.Tensor, amax: torch.Tensor, global_amax: torch.Tensor, fp8_max: float) -> torch.Tensor:
    """modelopt's pieces: FP8 block scales by scaled_e4m3_impl, the rounding by NVFP4QTensor (16-blocks of the
    flattened tensor); blocks whose scale is 0 are zeros."""
    blocks = x.reshape(-1, 16)
    scale = scaled_e4m3_impl(amax.float().reshape(-1) / 6.0, global_amax.float() * (448.0 / fp8_max) / 6.0)
    one = torch.tensor(1.0)
    qt, _, _ = NVFP4QTensor.quantize(blocks, 16, scale.reshape(-1, 1), one)
    out = qt.dequantize(dtype=x.dtype, scale=scale.reshape(-1, 1), double_scale=one, block_sizes={-1: 16})
    return out.masked_fill((scale == 0).reshape(-1, 1), 0.0).reshape(x.shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def case(shape: tuple[int, ...], dtype: torch.dtype, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, kind)).encode()))
    x = torch.randn(shape, generator=gen) * torch.rand(shape[:-1] + (1,), generator=gen) * 4
    if kind == "outliers":
        x.view(-1)[torch.randint(0, x.numel(), (max(1, x.numel() // 64),), generator=gen)] *= 300
    x = x.to(dtype)
    amax = x.float().reshape(-1, 16).abs().amax(-1)
    if kind == "zeros":  # every other block all zeros: amax 0, scale 0
        x.view(-1, 16)[::2] = 0
        amax = x.float().reshape(-1, 16).abs().amax(-1)
    elif kind == "fp8_candidates":  # what the FP8 sweep tries: global amax x (each FP8 value / 448)
        values = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float() / 448
        amax = amax.max() * values[torch.randint(0, 126, amax.shape, generator=gen)]
    elif kind == "underflow":  # block amax so small against the global one that the FP8 scale rounds to 0
        amax = amax * torch.where(torch.rand(amax.shape, generator=gen) < 0.5, 1e-6, 1.0)
    elif kind == "clipped":  # amax below the block's max: saturates at 6
        amax = amax * 0.3
    return x, amax


@pytest.mark.parametrize("fp8_max", [448.0, 256.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16), (37, 16), (4, 8, 32), (64, 256)])
@pytest.mark.parametrize("kind", ["data", "outliers", "zeros", "fp8_candidates", "underflow", "clipped"])
def test_bit_exact_vs_modelopt_reference(kind, shape, dtype, fp8_max):
    x, amax = case(shape, dtype, kind)
    for global_amax in (amax.max(), amax.max() * 2):
        out = static_fp4_fake_quant(x, amax, global_amax, True, fp8_max, dtype)
        ref = modelopt_reference(x, amax, global_amax, fp8_max)
        assert out.dtype == dtype and out.shape == x.shape
        # Bit for bit, the sign of zero too: NVFP4QTensor's table decodes code -0 as +0.0, and the kernel gives
        # +0.0 for a negative value that rounds to 0 (test_ties_and_signs_follow_the_kernel pins that).
        assert torch.equal(bits(out), bits(ref)), (kind, (out.float() - ref.float()).abs().max())
    if kind == "underflow":
        tiny = amax < amax.max() * 1e-4  # FP8 block scale rounds to 0 against the global amax
        assert (out.reshape(-1, 16)[tiny] == 0).all()  # the kernel's rule for a zero scale
        assert tiny.any() or amax.numel() == 1


def test_ties_and_signs_follow_the_kernel():
    """|x| / scale on every E2M1 decision boundary (ties to even), -0.0 -> +0.0, a tiny negative -> +0.0 (Triton
    negates as 0 - q: what an H100 and Triton 3.6's interpreter give)."""
    grid = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.25, -0.75, -1.75, -2.5, -3.5, -5.0, -0.0, -0.1])
    amax = torch.tensor([6.0 * 2**-3])
    out = static_fp4_fake_quant(grid * 2**-3, amax, amax)  # block scale exactly 2**-3
    expect = torch.tensor([0, 1, 1, 2, 2, 4, 4, 6, 0.0, -1, -2, -2, -4, -4, 0.0, 0.0]) * 2**-3
    assert torch.equal(bits(out), bits(expect))


def test_global_amax_none_and_unquantized_block_scales():
    x, amax = case((8, 32), torch.float32, "data")
    assert torch.equal(static_fp4_fake_quant(x, amax), static_fp4_fake_quant(x, amax, amax.max()))
    # float32 block scales (amax / 6, no FP8 rounding): every block's max maps to 6, back to amax up to rounding
    out = static_fp4_fake_quant(x, amax, None, False)
    torch.testing.assert_close(out.reshape(-1, 16).abs().amax(-1), amax, rtol=2e-7, atol=0)
    with pytest.raises(ValueError, match="not divisible"):
        static_fp4_fake_quant(torch.zeros(3, 16), torch.ones(5))


@pytest.mark.parametrize("four_over_six", [False, True])
def test_modelopts_static_quantizer_runs_on_cpu(four_over_six):
    """modelopt's own StaticBlockScaleQuantizer (promoted the way calibration promotes it) on CPU tensors: the
    output of ``static_fp4_fake_quant`` with the quantizer's amax, global amax and FP8 normalization."""
    nvfp4_static_cpu.register()
    blocks = {-1: 16, "type": "static", "scale_bits": (4, 3)} | ({"four_over_six": 1} if four_over_six else {})
    q = TensorQuantizer(QuantizerAttributeConfig(num_bits=(2, 1), block_sizes=blocks))
    w, _ = case((32, 64), torch.bfloat16, "data")
    q.amax = w.float().reshape(-1, 16).abs().amax(-1, keepdim=True) * 0.9
    StaticBlockScaleQuantizer.from_tensor_quantizer(q, global_amax=q.amax.max())
    assert isinstance(q, StaticBlockScaleQuantizer) and q.is_nvfp4_static
    out = q(w)
    expected = static_fp4_fake_quant(w, q.amax, q.global_amax, True, 256.0 if four_over_six else 448.0, w.dtype)
    assert torch.equal(bits(out), bits(expected))


_INTERPRETED = textwrap.dedent('''
    import sys, types, torch, triton
    import triton.language as tl  # noqa: F401  (the interpreter looks for it in the jit function's globals)
    @triton.jit
    def _isnan(x):
        return x != x
    from modelopt.torch.kernels.quantization.common import nvfp4_quant
    nvfp4_quant.libdevice = types.SimpleNamespace(isnan=_isnan)  # the interpreter has no CUDA libdevice
    from modelopt.torch.kernels.quantization.gemm import fp4_kernel as fk
    sys.path.insert(0, sys.argv[1])
    from test_nvfp4_static import case
    from deepseek_ptq.quant.nvfp4_static_cpu import static_fp4_fake_quant
    bad = 0
    for kind in ("data", "zeros", "fp8_candidates", "underflow", "clipped"):
        for m in (448.0, 256.0):
            x, amax = case((8, 32), torch.bfloat16, kind)
            n = amax.numel()
            scale = fk.compute_fp4_scales(amax, amax.max(), True, fp8_max_for_normalization=m)
            y = torch.empty(x.numel(), dtype=torch.float32)
            fk.static_blockwise_fp4_fake_quant_kernel[(n,)](x.reshape(-1), y, scale.reshape(n), n, 16,
                                                             OUT_DTYPE=fk._torch_dtype_to_tl(torch.float32))
            ref = y.to(x.dtype).view(x.shape)  # cast by torch: round to nearest even, Triton's default on a GPU
            out = static_fp4_fake_quant(x, amax, amax.max(), True, m, x.dtype)
            bad += int((out.view(torch.int16) != ref.view(torch.int16)).sum())
    print("differing", bad)
    sys.exit(1 if bad else 0)
''')


@pytest.mark.slow
def test_bit_exact_vs_modelopts_kernel_under_triton_interpreter(tmp_path):
    """modelopt's Triton kernel and its ``compute_fp4_scales``, run on the CPU by TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", _INTERPRETED, str(Path(__file__).parent)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_matches_modelopts_kernel(dtype):
    """On CUDA the dispatcher hands the call to modelopt's kernel. The torch implementation there agrees with it
    bit for bit except where the kernel's float32 division (PTX div.full.f32: within 2 ulp, not IEEE) puts
    |x| / scale on the other side of an E2M1 decision threshold. Seen on an H100 (modelopt 0.47, Triton 3.6):
    no such element for fp32 inputs, up to 172 of 131,072 for bf16 and fp16 ones (benchmarks/NOTES.md)."""
    pytest.importorskip("triton")
    from modelopt.torch.quantization.nn.modules import tensor_quantizer
    from modelopt.torch.quantization.tensor_quant import static_blockwise_fp4_fake_quant as kernel

    nvfp4_static_cpu.register()
    assert tensor_quantizer.static_blockwise_fp4_fake_quant.modelopt_kernel is kernel
    thresholds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device="cuda")
    for kind in ("data", "outliers", "zeros", "fp8_candidates", "underflow", "clipped"):
        x, amax = case((256, 512), dtype, kind)
        x, amax = x.cuda(), amax.cuda()
        for m in (448.0, 256.0):
            ref = kernel(x, amax, amax.max(), True, m, dtype, False)
            assert torch.equal(tensor_quantizer.static_blockwise_fp4_fake_quant(x, amax, amax.max(), True, m, dtype,
                                                                               False), ref)
            differ = bits(static_fp4_fake_quant(x, amax, amax.max(), True, m, dtype)) != bits(ref)
            if dtype == torch.float32:
                assert not differ.any(), (kind, m, int(differ.sum()))
                continue
            scale = nvfp4_static_cpu.block_scales(amax, amax.max(), True, m).reshape(-1, 1)
            ratio = (x.float().reshape(scale.numel(), -1).abs() / scale).reshape(-1, 1)
            near = ((ratio - thresholds).abs() <= 4 * thresholds * 2.0**-23).any(-1)  # within 4 ulp of one
            assert near[differ.reshape(-1)].all(), (kind, m, int(differ.sum()))
            assert differ.sum() <= 0.01 * differ.numel(), (kind, m, int(differ.sum()))


# -------------------------------------------------------------------------------------- the recipes end to end

# Two layers (one dense, one MoE) of the tiny geometry, seeded weights: the MSE sweep tries 126 FP8 scales for
# every weight (about 1 s per expert weight on the 2-core CPU machine), so the whole tiny model takes minutes.
SMALL = ["model=tiny_random", "model.n_layers=2", "eval.enabled=true", "eval.num_samples=4"]
OPTIONS = {"nvfp4_mse": ("NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG", "mse", 448.0),
           "nvfp4_local_hessian": ("NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG", "local_hessian", 448.0),
           "nvfp4_4o6": ("NVFP4_FOUR_OVER_SIX_CFG", "mse", 256.0)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    made: dict[str, Path] = {}

    def run(option: str) -> Path:
        if option not in made:
            made[option] = run_job(tmp_path_factory.mktemp(option), SMALL + [f"quant={option}"])
        return made[option]
    return run


def _real_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every linear's dequantized (bf16) weight, from the run's checkpoint: what its quantizers saw."""
    from deepseek_ptq.model.load import build_model, checkpoint_dir, resolve_args
    from deepseek_ptq.model.parallel import Linear, Parallel

    cfg = make_cfg(SMALL)
    args = resolve_args(cfg.model)
    ckpt = checkpoint_dir(cfg.model, args, 1)
    assert str(ckpt) == json.loads((run_dir / "metrics.json").read_text())["ckpt_dir"]
    model = build_model(args, ckpt, Parallel(), torch.device("cpu"), progress=False)
    with torch.no_grad():
        return {n: m.dequantized_weight() for n, m in model.named_modules() if isinstance(m, Linear)}


def _hf(module: str) -> str:
    table = {"attn": "self_attn", "ffn": "mlp", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    return "model." + ".".join(table.get(p, p) for p in module.split("."))


@pytest.mark.parametrize("option", list(OPTIONS))
def test_recipe_calibrates_evaluates_and_exports(runs, option, tmp_path):
    preset, method, fp8_max = OPTIONS[option]
    run_dir = runs(option)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["quant_preset"] == preset
    assert metrics["counts"]["missing_amax"] == 0
    assert 0 < metrics["eval"]["kl"] < 0.5 and metrics["eval"]["top1_agreement"] > 0.5
    # The fast path does not serve search algorithms: the plain path ran, and the log says why.
    assert f"plain calibration path: algorithm {method!r}" in (run_dir / "run.log").read_text()
    amax = {}
    for path in (run_dir / "amax").glob("*.pt"):
        amax.update(torch.load(path))

    out = export_run(run_dir, tmp_path / "hf", unquantized="fp8", progress=False)
    tensors = {}
    for path in out.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"
    real = _real_weights(run_dir)
    weights = [k.removesuffix(".weight_quantizer._global_amax") for k in amax if k.endswith("._global_amax")]
    assert len(weights) == 3 + 2 + 16 * 3 + 3  # dense w1/w2/w3, wo of both layers, experts, shared experts
    blocks = {"type": "static", -1: 16, "scale_bits": (4, 3)} | ({"four_over_six": 1} if fp8_max == 256 else {})
    searched = 0  # blocks whose amax the search moved off the block's own max
    for name in weights:
        block_amax, global_amax = amax[f"{name}.weight_quantizer._amax"], amax[f"{name}.weight_quantizer._global_amax"]
        data_max = real[name].float().reshape(-1, 16).abs().amax(-1)
        searched += int((block_amax.reshape(-1) != data_max).sum())
        # The evaluated weight: modelopt's static quantizer holding the run's amax.
        q = TensorQuantizer(QuantizerAttributeConfig(num_bits=(2, 1), block_sizes=blocks))
        q.amax = block_amax
        StaticBlockScaleQuantizer.from_tensor_quantizer(q, global_amax=global_amax)
        with torch.no_grad():
            evaluated = q(real[name])
        p = _hf(name)
        packed, scale, scale_2 = tensors[f"{p}.weight"], tensors[f"{p}.weight_scale"], tensors[f"{p}.weight_scale_2"]
        assert scale.dtype == torch.float8_e4m3fn and scale.shape == (real[name].shape[0], real[name].shape[1] // 16)
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
        decoded = (E2M1[codes.long()] * (scale.float() * scale_2.float()).repeat_interleave(16, dim=-1))
        assert torch.equal(decoded.to(torch.bfloat16), evaluated), name
        # weight_scale_2: the scale the fake quantization multiplies, within an ulp of global amax / (6 x fp8_max)
        assert torch.equal(scale_2, 1 / (448.0 / (global_amax.float() * (448.0 / fp8_max) / 6.0)))
        assert abs(float(scale_2) / float(global_amax / (6 * fp8_max)) - 1) < 2e-7
        input_amax = amax[f"{name}.input_quantizer._amax"].float()
        assert torch.equal(tensors[f"{p}.input_scale"], input_amax / 2688)
    assert searched > 0
    # stats/amax.csv: a static weight's per-tensor figure is its global amax (the scale engines read)
    with open(run_dir / "stats" / "amax.csv") as f:
        rows = {r["quantizer"]: r for r in csv.DictReader(f)}
    for name in weights:
        assert float(rows[f"{name}.weight_quantizer"]["amax_after"]) == float(amax[f"{name}.weight_quantizer._global_amax"])
    # w1/w3 share one global amax (modelopt's shared state): one weight_scale_2, as engines need
    w1 = [n for n in weights if n.endswith(".w1")]
    assert w1 and all(torch.equal(tensors[f"{_hf(n)}.weight_scale_2"], tensors[f"{_hf(n[:-1] + '3')}.weight_scale_2"])
                      for n in w1)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_layerwise_and_several_ranks_are_refused_before_any_rank(option):
    from deepseek_ptq.pipeline.validate import validate

    with pytest.raises(UserError, match="not supported layer by layer"):
        validate(make_cfg(SMALL + [f"quant={option}", "calib.layerwise=true"]))
    with pytest.raises(UserError, match="parallel.world_size=1 only"):
        validate(make_cfg(SMALL + [f"quant={option}", "parallel=mp2"]))
