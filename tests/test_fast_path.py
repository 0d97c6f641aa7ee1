"""The fast calibration path (quant/fast/) computes what the plain path computes: on the CPU, bit for bit, with
real modelopt on the tiny model. The fixup has its own test (tests/test_fixup.py)."""

from __future__ import annotations

import pytest
import torch
from modelopt.torch.quantization.nn import TensorQuantizer
from omegaconf import OmegaConf

from deepseek_ptq.devtools.bench import quantizer_amax
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.load import PACKAGED
from deepseek_ptq.model.moe import MoE
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.model.synthetic import init_random_
from deepseek_ptq.model.transformer import Transformer
from deepseek_ptq.quant.calibrate import calibrate
from deepseek_ptq.quant.fast import FastOptions, Grouped, in_use, why_not
from deepseek_ptq.quant.fast import moe as fast_moe
from deepseek_ptq.quant.recipes import build_quant_config

TINY = ModelArgs.from_json(PACKAGED / "tiny.json")
PRESETS = {"nvfp4": "NVFP4_DEFAULT_CFG", "fp8": "FP8_DEFAULT_CFG"}
CPU = torch.device("cpu")


def quant_cfg(preset: str, attn: str | None = None):
    return OmegaConf.create({"name": preset, "preset": preset, "attn": attn, "wo": None, "kv_cache": None,
                             "algorithm": None})


def batches(n: int, batch: int = 4, seq: int = 64, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (batch, seq), generator=gen) for _ in range(n)]


def calibrated(use_fast: bool, all_experts: bool, preset: str, data: list[torch.Tensor],
               device: torch.device = CPU, attn: str | None = None,
               options: FastOptions | None = None) -> tuple[dict, dict, list[bool]]:
    """(amax by quantizer, amax dtypes, whether each batch ran the fast path) of a fresh tiny model."""
    with torch.device(device):
        model = Transformer(TINY)
    init_random_(model, 0)
    model.eval()
    used: list[bool] = []
    calibrate(model, build_quant_config(quant_cfg(preset, attn), on_cpu=device.type == "cpu"), data, all_experts,
              device, False, on_batch=lambda _: used.append(in_use(model)), fast=use_fast, fast_options=options)
    assert not in_use(model)  # detached after calibration
    if "AWQ" not in preset:  # (modelopt's AWQ leaves forwards of its own bound)
        assert not any("forward" in m.__dict__ or m._forward_pre_hooks for m in model.modules())  # restored
    dtypes = {n: m._amax.dtype for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and hasattr(m, "_amax")}
    return quantizer_amax(model), dtypes, used


def assert_identical(plain: tuple, fast: tuple) -> None:
    assert plain[0].keys() == fast[0].keys()
    different = [k for k in plain[0] if not torch.equal(plain[0][k], fast[0][k])]
    assert not different, f"{len(different)} amax differ, first {different[:3]}"
    assert plain[1] == fast[1]  # modelopt keeps an amax in its input's dtype: so does the fast path


@pytest.mark.parametrize("quant", ["nvfp4", "fp8"])
@pytest.mark.parametrize("mode", ["topk", "all_experts"])
def test_fast_path_amax_bit_identical_to_plain(quant, mode):
    data = batches(3)
    plain = calibrated(False, mode == "all_experts", PRESETS[quant], data)
    fast = calibrated(True, mode == "all_experts", PRESETS[quant], data)
    assert plain[2] == [False] * 3 and fast[2] == [True] * 3
    assert_identical(plain, fast)
    assert len(fast[0]) > 300


def test_fast_path_identical_with_few_tokens_and_transient_weights():
    """Experts without tokens keep no amax either way; weights dequantized again every batch change nothing."""
    transient = FastOptions(keep_weights=False)
    few = batches(2, batch=1, seq=3)
    plain = calibrated(False, False, PRESETS["nvfp4"], few)
    assert_identical(plain, calibrated(True, False, PRESETS["nvfp4"], few, options=transient))
    expert_inputs = [k for k in plain[0] if ".experts." in k and "input" in k]
    assert len(expert_inputs) < 3 * 3 * TINY.n_routed_experts  # some experts saw no token
    assert_identical(calibrated(False, True, PRESETS["fp8"], few),
                     calibrated(True, True, PRESETS["fp8"], few, options=transient))


def test_fast_path_identical_with_quantized_attention():
    data = batches(2)
    assert_identical(calibrated(False, False, PRESETS["nvfp4"], data, attn="fp8"),
                     calibrated(True, False, PRESETS["nvfp4"], data, attn="fp8"))


def test_plain_path_where_the_fast_one_would_not_be_exact():
    # AWQ patches module forwards and runs the loop several times: the plain path runs every batch.
    assert not any(calibrated(True, False, "NVFP4_AWQ_LITE_CFG", batches(1, batch=1, seq=8))[2])
    seen: list[str | None] = []

    def loop(model):
        seen.append(why_not(model, "max"))
        q = model.layers[1].ffn.experts[0].w2.input_quantizer
        q.axis = 0  # per-channel expert input amax: a segment max per tensor would not be it
        seen.append(why_not(model, "max"))
        q.axis = None
        model.layers[1].attn.wo.input_quantizer.pre_quant_scale = torch.ones(TINY.n_heads * TINY.v_head_dim)
        seen.append(why_not(model, "max"))

    import modelopt.torch.quantization as mtq

    from deepseek_ptq.quant import modules

    modules.register()
    model = Transformer(TINY)
    init_random_(model, 0)
    mtq.quantize(model, build_quant_config(quant_cfg(PRESETS["nvfp4"]), on_cpu=True), loop)
    assert seen[0] is None
    assert "layers.1.ffn.experts.0.w2" in seen[1] and "not per tensor" in seen[1]
    assert "layers.1.attn.wo" in seen[2] and "transforms its input" in seen[2]


@pytest.mark.parametrize("all_experts", [False, True])
def test_leaving_the_seam_restores_the_model(all_experts):
    """Entering binds calibration forwards onto instances; leaving gives every module back what it had."""
    import modelopt.torch.quantization as mtq

    from deepseek_ptq.quant import modules
    from deepseek_ptq.quant.calibrate import plain_calibration
    from deepseek_ptq.quant.fast import fast_calibration

    def state(model):
        return {n: ({k: id(v) for k, v in vars(m).items() if not k.startswith("_")}, len(m._forward_pre_hooks),
                    len(m._forward_hooks)) for n, m in model.named_modules()}

    seen = {}

    def loop(model):
        before = state(model)
        tokens = batches(1, batch=1, seq=8)[0]
        with fast_calibration(model, all_experts, FastOptions(keep_weights=True)) as fc:
            assert in_use(model) and state(model) != before
            model(tokens, logits=False)
            fc.flush()
        seen["fast"] = state(model) == before and not in_use(model)
        with plain_calibration(model, all_experts):
            model(tokens, logits=False)
        seen["plain"] = state(model) == before

    modules.register()
    model = Transformer(TINY)
    init_random_(model, 0)
    mtq.quantize(model, build_quant_config(quant_cfg(PRESETS["nvfp4"]), on_cpu=True), loop)
    assert seen == {"fast": True, "plain": True}


@pytest.mark.parametrize("use_fast", [True, False])
def test_overflowing_activations_name_the_module_on_either_path(use_fast):
    """modelopt's assertion in the plain path and the fast path's merge both end as a UserError naming a module."""
    from deepseek_ptq.errors import UserError

    model = Transformer(TINY)
    init_random_(model, 0)
    model.eval()
    model.layers[1].attn_norm.weight.data.fill_(3e38)  # finite weight, but activations overflow to inf
    with pytest.raises(UserError, match=r"non-finite activations during calibration, first at layers\.1"):
        calibrate(model, build_quant_config(quant_cfg(PRESETS["nvfp4"]), on_cpu=True), batches(1), False, CPU, False,
                  fast=use_fast)
    assert not in_use(model)


def _moe(rank: int, world_size: int) -> MoE:
    torch.manual_seed(0)
    moe = MoE(TINY, Parallel(rank=rank, world_size=world_size), fp8=True)
    for p in moe.parameters():
        p.data.copy_(torch.randn(p.shape).to(p.dtype) if p.dtype != torch.float32 else torch.rand(p.shape) * 1e-2)
    return moe


@pytest.mark.parametrize("rank,world_size", [(0, 1), (0, 2), (1, 2)])
def test_routed_forward_matches_the_plain_loop(rank, world_size, grouped: Grouped = Grouped()):
    moe = _moe(rank, world_size)
    x = torch.randn(6, TINY.dim).bfloat16()  # 6 tokens x 4 experts of 16: some experts get none
    weights, indices = moe.gate(x)
    counts = torch.bincount(indices.flatten(), minlength=TINY.n_routed_experts)
    want = moe.routed(x, weights, indices, counts)
    w13, w2 = fast_moe.stacked_expert_weights(moe)
    n_local = moe.experts_end - moe.experts_start
    stats = fast_moe.ExpertStats.empty(n_local, CPU)
    got = fast_moe.routed_forward(moe, x, weights, indices, w13, w2, stats, grouped)
    assert torch.equal(got, want)
    for slot, (e, expert) in enumerate(moe.local_experts()):
        rows = (indices == e).any(dim=1)
        if not rows.any():
            assert stats.w13[slot] == stats.w2[slot] == float("-inf")
            continue
        h = torch.nn.functional.silu(expert.w1(x[rows])) * expert.w3(x[rows])
        assert stats.w13[slot] == x[rows].abs().max().float()
        assert stats.w2[slot] == h.abs().max().float()
    assert (stats.w13[:n_local] == float("-inf")).any()


def test_all_token_stats_are_each_experts_max_over_all_tokens():
    moe = _moe(0, 1)
    x = torch.randn(5, TINY.dim).bfloat16()
    w13, _ = fast_moe.stacked_expert_weights(moe)
    stats = fast_moe.ExpertStats.empty(TINY.n_routed_experts, CPU)
    fast_moe.all_token_stats(x, w13, stats)
    assert (stats.w13[:-1] == x.abs().max().float()).all()
    for e, expert in moe.local_experts():
        h = torch.nn.functional.silu(expert.w1(x)) * expert.w3(x)
        assert stats.w2[e] == h.abs().max().float()


@pytest.mark.parametrize("layout", ["tokens_m", "weights_m"])
@pytest.mark.parametrize("pad", [False, True])
def test_every_grouped_layout_gives_the_plain_output(layout, pad):
    test_routed_forward_matches_the_plain_loop(0, 2, Grouped(layout, pad))


@pytest.mark.slow  # two spawned ranks or several subprocess runs
def test_fast_path_identical_at_mp2(cache_dir, tmp_path):
    """Two gloo ranks (spawned, the environment inherited): every amax of both ranks, fast and plain, agree."""
    from conftest import load_amax, run_job

    runs = {}
    for fast in (True, False):
        run_dir = run_job(tmp_path / str(fast), ["parallel=mp2", "parallel.device=cpu", "calib=topk", "data.num_samples=4",
                                                f"calib.fast={fast}"])
        assert ("fast calibration path" in (run_dir / "run.log").read_text()) == fast
        runs[fast] = load_amax(run_dir)
    assert runs[True].keys() == runs[False].keys() and len(runs[True]) > 300
    assert all(torch.equal(runs[True][k], runs[False][k]) for k in runs[True])


# ------------------------------------------------------------------------------------------ on a GPU

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("combine", ["auto", "torch"])
@pytest.mark.parametrize("mode", ["topk", "all_experts"])
def test_gpu_fast_path_close_to_plain(mode, combine):
    """On a GPU the grouped GEMM may round an expert's output differently from one cuBLAS call per expert (1 bf16
    ulp), and the next layers see slightly different inputs. What precedes the first grouped GEMM must be
    identical: every weight amax, the layers before the first MoE layer, that layer's w1/w3 inputs. In all-experts
    mode the w2 inputs of that layer come from the plain path's own GEMM calls: identical too. Later amax: within
    5% in all-experts mode; in top-k mode a token whose routing flips can move an expert's max further, so there
    only most of them must agree within 5%."""
    dev = torch.device("cuda")
    data = batches(3, batch=8, seq=128)
    plain = calibrated(False, mode == "all_experts", PRESETS["nvfp4"], data, dev)
    fastest = calibrated(True, mode == "all_experts", PRESETS["nvfp4"], data, dev, options=FastOptions(combine=combine))
    assert fastest[2] == [True] * 3 and plain[0].keys() == fastest[0].keys()
    first_moe = TINY.n_dense_layers
    gaps = {}
    for key, a in plain[0].items():
        b = fastest[0][key]
        layer = int(key.split(".")[1]) if key.startswith("layers.") else -1
        expert_w2_input = ".experts." in key and ".w2.input_quantizer" in key
        must_match = "weight_quantizer" in key or layer < first_moe or (
            layer == first_moe and (not expert_w2_input or mode == "all_experts"))
        if must_match:
            assert torch.equal(a, b), key
        gaps[key] = ((a - b).abs() / a.abs()).max().item()
    identical = sum(g == 0 for g in gaps.values())
    worst = max(gaps, key=gaps.get)
    print(f"GPU fast vs plain ({mode}, combine={combine}): {identical}/{len(gaps)} identical, worst {worst} {gaps[worst]:.2e}")
    within = sum(g <= 5e-2 for g in gaps.values())
    assert within == len(gaps) if mode == "all_experts" else within >= 0.9 * len(gaps)


@pytest.mark.gpu
@CUDA
def test_gpu_moe_combine_bit_identical_to_torch_ops():
    from deepseek_ptq.model import triton_kernels

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    rows, dim, tokens, k = 3000, 7168, 400, 8
    out = torch.randn(rows, dim, generator=gen, device=dev).bfloat16() * 3
    pos = torch.randint(0, rows, (tokens, k), generator=gen, device=dev)
    pos[torch.rand(tokens, k, generator=gen, device=dev) < 0.3] = -1  # other ranks' experts
    weights = torch.rand(tokens, k, generator=gen, device=dev).bfloat16()
    got = triton_kernels.moe_combine(out, pos, weights)
    want = fast_moe.moe_combine_torch(out, pos, weights)
    assert not torch.isnan(got).any() and torch.equal(got, want)


@pytest.mark.gpu
@CUDA
def test_gpu_swiglu_amax_bit_identical_to_torch_ops():
    """The all-experts w2 input amax kernel against silu(a1) * a3 and the inf-norm in torch's bf16 ops: 65,536
    maxima of 128 values each and whole tensors, magnitudes from 1e-6 to 1e3 (exp's overflow), NaN and inf."""
    from deepseek_ptq.model import triton_kernels

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    assert fast_moe.triton_swiglu_is_exact(dev) and fast_moe.uses_triton_swiglu(dev, "auto")
    scale = torch.logspace(-6, 3, 65536, device=dev)[torch.randperm(65536, generator=gen, device=dev), None]
    a1, a3 = ((torch.randn(65536, 128, generator=gen, device=dev) * scale).bfloat16() for _ in range(2))
    got = triton_kernels.swiglu_absmax(a1, a3, segment_rows=1, block_rows=1, block_cols=128)
    got = got.view(torch.float32).to(torch.bfloat16)
    assert torch.equal(got, torch.linalg.vector_norm(torch.nn.functional.silu(a1) * a3, float("inf"), dim=1))
    for rows in (1, 7, 8192):  # whole matrices, strided (a GEMM output's halves), the last blocks partly masked
        x1, x3 = a1[:rows, :100], a3[:rows, 28:]
        whole = triton_kernels.swiglu_absmax(x1, x3).view(torch.float32).to(torch.bfloat16)
        assert torch.equal(whole[0], fast_moe.swiglu_absmax_torch(x1, x3)), rows
    for bad in (float("nan"), float("inf")):
        x1 = a1[:64].clone()
        x1[17, 5] = bad
        want = fast_moe.swiglu_absmax_torch(x1, a3[:64])
        got = triton_kernels.swiglu_absmax(x1, a3[:64]).view(torch.float32).to(torch.bfloat16)[0]
        assert not want.isfinite() and (torch.equal(got, want) or (got.isnan() and want.isnan())), (bad, got, want)
    # The fast path's all-experts statistics, kernel and torch ops, on one MoE layer's experts.
    moe = _moe(0, 1).cuda()
    x = torch.randn(300, TINY.dim, device=dev, generator=gen).bfloat16()
    w13, _ = fast_moe.stacked_expert_weights(moe)
    stats = [fast_moe.ExpertStats.empty(TINY.n_routed_experts, dev) for _ in range(2)]
    fast_moe.all_token_stats(x, w13, stats[0], swiglu_kernel=True)
    fast_moe.all_token_stats(x, w13, stats[1], swiglu_kernel=False)
    assert torch.equal(stats[0].w2, stats[1].w2) and torch.equal(stats[0].w13, stats[1].w13)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("layout", ["tokens_m"])  # weights_m: CUDA torch 2.11 needs group sizes in multiples of 8
@pytest.mark.parametrize("pad", [False, True])
def test_gpu_every_grouped_layout_close_to_the_plain_loop(layout, pad):
    """The grouped GEMM may round differently from one cuBLAS call per expert: 1 bf16 ulp (2^-8) per output."""
    moe = _moe(0, 2).cuda()
    x = torch.randn(512, TINY.dim, device="cuda").bfloat16()
    weights, indices = moe.gate(x)
    counts = torch.bincount(indices.flatten(), minlength=TINY.n_routed_experts)
    want = moe.routed(x, weights, indices, counts).float()
    w13, w2 = fast_moe.stacked_expert_weights(moe)
    stats = fast_moe.ExpertStats.empty(moe.experts_end - moe.experts_start, x.device)
    got = fast_moe.routed_forward(moe, x, weights, indices, w13, w2, stats, Grouped(layout, pad)).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2
    for slot, (e, expert) in enumerate(moe.local_experts()):
        rows = (indices == e).any(dim=1)
        if rows.any():
            h = torch.nn.functional.silu(expert.w1(x[rows])) * expert.w3(x[rows])
            assert stats.w13[slot] == x[rows].abs().max().float()
            assert abs(stats.w2[slot] / h.abs().max().float() - 1) <= 2 ** -6


@pytest.mark.gpu
@CUDA
def test_gpu_more_ranks_than_gpus_fail_before_any_rank_starts():
    """NCCL refuses two ranks on one device only after the spawn: the launcher says it first, with the fix."""
    from deepseek_ptq.errors import UserError
    from deepseek_ptq.pipeline.launch import check_local_gpus

    check_local_gpus("cuda", torch.cuda.device_count())
    with pytest.raises(UserError, match="one rank per GPU"):
        check_local_gpus("auto", torch.cuda.device_count() + 1)
