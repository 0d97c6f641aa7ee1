"""Export of calibrated tiny runs to the Hugging Face layout serving engines load (NVFP4, NVFP4 attention, FP8;
W = 1 and 2).

What "bit for bit" compares: for every quantized linear, the exported weight decoded the way an engine does
(NVFP4: E2M1 code x float8 block scale x weight_scale_2, to bf16; FP8: code x scale; the decoders below are
written independently of the exporter) against the evaluated model's fake-quantized weight
``weight_quantizer(dequantized_weight())``: the model rebuilt from the run's W = 1 checkpoint, quantized by
modelopt with the run's config (CPU NVFP4 backend), the run's merged amax dicts loaded into its quantizers as
they are. The run itself gave every fused pair (w1/w3, wq_a/wkv_a) one amax before it evaluated, so nothing is
adjusted here. The W = 2 runs are checked against the same W = 1 model (a 16-element NVFP4 block never crosses
a shard boundary, so the full tensor quantizes like its shards).
FP8: the exported codes times modelopt's own scale inverse (1 / (448 / amax)) give the fake-quantized weight bit
for bit; ``weight_scale`` is amax / 448, the scale engines multiply back.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, make_cfg, run_job
from omegaconf import OmegaConf
from safetensors import safe_open

from deepseek_ptq.errors import UserError
from deepseek_ptq.hf.export import export_run, merge_amax
from deepseek_ptq.hf.formats import FP8, NVFP4, module_formats
from deepseek_ptq.hf.nvfp4_pack import unpack_nvfp4
from deepseek_ptq.model.load import build_model, checkpoint_dir, resolve_args
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.quant.recipes import build_quant_config

TINY = ["model=tiny_random"]
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# The quant choices the export writes: the default NVFP4, NVFP4 attention projections too, FP8.
FORMATS = {"nvfp4": [], "attn_nvfp4": ["quant.attn=nvfp4"], "fp8": ["quant=fp8"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """run(fmt, world_size): the run directory of that calibration, made once per module."""
    made: dict[tuple[str, int], Path] = {}

    def run(fmt: str, world_size: int) -> Path:
        if (fmt, world_size) not in made:
            extra = ["parallel=mp2"] if world_size == 2 else []
            made[fmt, world_size] = run_job(tmp_path_factory.mktemp(f"{fmt}_w{world_size}"), TINY + FORMATS[fmt] + extra)
        return made[fmt, world_size]
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory, runs):
    """export(fmt, world_size): the run's export, made once (small shards: the index spans several files)."""
    made: dict[tuple[str, int], Path] = {}

    def export(fmt: str, world_size: int) -> Path:
        if (fmt, world_size) not in made:
            out = tmp_path_factory.mktemp("exports") / f"hf_{fmt}_w{world_size}"
            made[fmt, world_size] = export_run(runs(fmt, world_size), out, max_shard_bytes=2_000_000,
                                               unquantized="fp8", progress=False)
        return made[fmt, world_size]
    return export


@pytest.fixture(scope="module")
def run_w1(runs) -> Path:
    return runs("nvfp4", 1)


@pytest.fixture(scope="module")
def run_w2(runs) -> Path:
    return runs("nvfp4", 2)


@pytest.fixture(scope="module")
def exports(exported) -> dict[int, Path]:
    return {w: exported("nvfp4", w) for w in (1, 2)}


def read_export(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an exported folder, checking that the index and the files agree."""
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    assert sorted(set(index["weight_map"].values())) == [f.name for f in files]
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == path.name
                tensors[key] = f.get_tensor(key)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors


def decode_nvfp4(packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """An engine's view: low nibble = even element, high nibble = odd element, times its 16-block scale."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
    block = (scale.float() * scale_2.float()).repeat_interleave(16, dim=-1)
    return (E2M1[codes.long()] * block).to(torch.bfloat16)


def quant_group(run_dir: Path):
    return OmegaConf.create(json.loads((run_dir / "hf_quant_config.json").read_text())["config"])


def calibrated_model(run_dir: Path, overrides: list[str]):
    """The run's model at W = 1, quantized with its config, holding the run's (merged) amax."""
    from deepseek_ptq.quant.calibrate import calibrate
    from deepseek_ptq.quant.modules import quantized_linears

    cfg = make_cfg(FAST + overrides)
    args = resolve_args(cfg.model)
    ckpt = checkpoint_dir(cfg.model, args, 1)
    assert str(ckpt) == json.loads((run_dir / "metrics.json").read_text())["ckpt_dir"]
    model = build_model(args, ckpt, Parallel(), torch.device("cpu"), progress=False)
    tokens = torch.randint(0, args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    # all_experts: every quantizer gets an amax buffer, then the run's values replace them all.
    calibrate(model, build_quant_config(cfg.quant, on_cpu=True), [tokens], True, torch.device("cpu"), False)
    amax = merge_amax(run_dir, json.loads((run_dir / "metrics.json").read_text())["world_size"])
    result = model.load_state_dict(amax, strict=False)
    assert not result.unexpected_keys
    return model, dict(quantized_linears(model)), amax


def hf(module: str) -> str:
    """Literal DeepSeek -> Hugging Face module names (independent of deepseek_ptq.hf.names)."""
    table = {"attn": "self_attn", "ffn": "mlp", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj",
             "wq_a": "q_a_proj", "wq_b": "q_b_proj", "wkv_a": "kv_a_proj_with_mqa", "wkv_b": "kv_b_proj"}
    return "model." + ".".join(table.get(p, p) for p in module.split("."))


def decode_fp8(codes: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """FP8 codes times modelopt's own scale inverse (1 / (448 / amax)), to bf16."""
    return (codes.float() * (1 / (448.0 / amax.float()))).to(torch.bfloat16)


FUSED = (("w1", "w3"), ("wq_a", "wkv_a"))  # literal: what engines run as one GEMM (README, "Engine constraints")


@pytest.mark.parametrize("world_size", [1, pytest.param(2, marks=pytest.mark.slow)])  # W = 2: two spawned ranks
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_export_equals_the_evaluated_model(runs, exported, fmt, world_size):
    run_dir = runs(fmt, world_size)
    tensors = read_export(exported(fmt, world_size))
    model, linears, amax = calibrated_model(run_dir, TINY + FORMATS[fmt])
    quantized = {n: m for n, m in linears.items() if m.weight_quantizer.is_enabled}
    attn = {n for n in quantized if ".attn." in n}
    assert len(quantized) - len(attn) == 156  # dense w1/w2/w3 + 3 MoE layers x (16 experts + shared) x 3
    assert {n.rsplit(".", 1)[1] for n in attn} == {"nvfp4": {"wo"}, "attn_nvfp4": {"wq_a", "wq_b", "wkv_a", "wo"},
                                                  "fp8": set()}[fmt]
    nvfp4 = fmt != "fp8"
    with torch.no_grad():
        for name, module in quantized.items():
            p = hf(name)
            weight, scale = tensors[f"{p}.weight"], tensors[f"{p}.weight_scale"]
            weight_amax = amax[f"{name}.weight_quantizer._amax"].float()
            input_amax = amax[f"{name}.input_quantizer._amax"].float()
            out_f, in_f = module.weight.shape
            expected = module.weight_quantizer(module.dequantized_weight())
            if nvfp4:
                scale_2 = tensors[f"{p}.weight_scale_2"]
                assert (weight.dtype, tuple(weight.shape)) == (torch.uint8, (out_f, in_f // 2))
                assert (scale.dtype, tuple(scale.shape)) == (torch.float8_e4m3fn, (out_f, in_f // 16))
                assert (scale_2.dtype, scale_2.shape) == (torch.float32, torch.Size([]))
                assert torch.equal(decode_nvfp4(weight, scale, scale_2), expected), name
                assert torch.equal(unpack_nvfp4(weight, scale, scale_2), expected), name
                assert torch.equal(scale_2, weight_amax / 2688)
                assert torch.equal(tensors[f"{p}.input_scale"], input_amax / 2688)
            else:
                assert weight.dtype == torch.float8_e4m3fn and weight.shape == module.weight.shape
                assert torch.equal(decode_fp8(weight, weight_amax), expected), name
                assert torch.equal(scale, weight_amax / 448)
                assert torch.equal(tensors[f"{p}.input_scale"], input_amax / 448)
            assert tensors[f"{p}.input_scale"].dtype == torch.float32
    # Every fused pair exported with one weight scale and one input scale, as engines need them.
    pairs = [(n, n[: -len(a)] + b) for n in quantized for a, b in FUSED if n.endswith("." + a)]
    assert len(pairs) == 52 + (4 if fmt == "attn_nvfp4" else 0)
    weight_scale = "weight_scale_2" if nvfp4 else "weight_scale"
    for a, b in pairs:
        for kind in (weight_scale, "input_scale"):
            assert torch.equal(tensors[f"{hf(a)}.{kind}"], tensors[f"{hf(b)}.{kind}"]), (a, b, kind)
    # The rule was exercised: the run raised the smaller weight amax of some pairs (amax.csv says which).
    with open(run_dir / "stats" / "amax.csv") as f:
        fused = {r["quantizer"] for r in csv.DictReader(f) if r["source"] == "fused_max"}
    assert any(q.endswith(".w3.weight_quantizer") or q.endswith(".w1.weight_quantizer") for q in fused)
    assert fmt != "attn_nvfp4" or any(".attn.wq_a.weight" in q or ".attn.wkv_a.weight" in q for q in fused)
    if fmt == "nvfp4" and world_size == 1:
        _check_other_tensors(tensors, model)


def _check_other_tensors(tensors: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Linears left unquantized keep the released FP8 form; the rest keeps its values under its HF name."""
    state = model.state_dict()
    for name in ("layers.2.attn.wq_a", "layers.0.attn.wkv_b"):
        assert torch.equal(tensors[f"{hf(name)}.weight"].view(torch.uint8), state[f"{name}.weight"].view(torch.uint8))
        assert torch.equal(tensors[f"{hf(name)}.weight_scale_inv"], state[f"{name}.scale"])
    assert torch.equal(tensors["model.layers.3.mlp.gate.e_score_correction_bias"], state["layers.3.ffn.gate.bias"])
    assert tensors["model.layers.3.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert torch.equal(tensors["model.layers.1.mlp.gate.weight"], state["layers.1.ffn.gate.weight"])
    assert torch.equal(tensors["lm_head.weight"], state["head.weight"])
    assert torch.equal(tensors["model.embed_tokens.weight"], state["embed.weight"])
    assert torch.equal(tensors["model.layers.0.input_layernorm.weight"], state["layers.0.attn_norm.weight"])
    assert torch.equal(tensors["model.norm.weight"], state["norm.weight"])
    assert not [k for k in tensors if not k.startswith(("model.", "lm_head."))]


@pytest.mark.slow  # run_w2: two spawned ranks
def test_world_sizes_export_one_layout(exports):
    one, two = (read_export(exports[w]) for w in (1, 2))
    assert {k: (v.dtype, v.shape) for k, v in one.items()} == {k: (v.dtype, v.shape) for k, v in two.items()}
    assert len(list(exports[1].glob("model-*-of-*.safetensors"))) > 1


@pytest.mark.slow  # run_w2: two spawned ranks
def test_export_metadata(exports):
    out = exports[2]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["model_type"] == "deepseek_v3"
    assert (config["hidden_size"], config["num_hidden_layers"], config["n_routed_experts"]) == (256, 4, 16)
    assert (config["first_k_dense_replace"], config["num_experts_per_tok"], config["topk_method"]) == (1, 4, "noaux_tc")
    qc = config["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == NVFP4
    assert qc["config_groups"]["group_0"]["weights"] == {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == NVFP4 and quant["group_size"] == 16
    assert "lm_head" in quant["exclude_modules"] and "model.layers.1.mlp.gate" in quant["exclude_modules"]
    assert "model.layers.0.self_attn.q_a_proj" in quant["exclude_modules"]
    assert "model.layers.0.self_attn.o_proj" not in quant["exclude_modules"]
    assert qc["ignore"] == quant["exclude_modules"]
    assert not list(out.parent.glob(".*tmp*"))


def test_formats_follow_the_run(run_w1):
    """The replayed modelopt config quantizes exactly the linears the run calibrated; other options map too."""
    amax = merge_amax(run_w1, 1)
    modules = sorted({k.split(".weight_quantizer")[0].split(".input_quantizer")[0] for k in amax})
    linears = modules + ["layers.0.attn.wq_a", "layers.0.attn.wkv_b", "head"]
    formats = module_formats(build_quant_config(quant_group(run_w1), on_cpu=False), linears, "NVFP4_DEFAULT_CFG")
    assert {m for m, f in formats.items() if f} == set(modules)
    assert set(formats.values()) == {NVFP4, None}
    mixed = OmegaConf.create({"name": "nvfp4", "preset": "NVFP4_DEFAULT_CFG", "attn": "fp8", "wo": None,
                              "kv_cache": None, "algorithm": None})
    formats = module_formats(build_quant_config(mixed, on_cpu=False), linears, "NVFP4_DEFAULT_CFG")
    assert formats["layers.0.attn.wq_a"] == FP8 and formats["layers.1.ffn.experts.0.w2"] == NVFP4
    assert formats["head"] is None
    awq = OmegaConf.create({**OmegaConf.to_container(mixed), "preset": "INT4_AWQ_CFG", "attn": None})
    with pytest.raises(UserError, match="INT4_AWQ_CFG"):
        module_formats(build_quant_config(awq, on_cpu=False), linears, "INT4_AWQ_CFG")


def test_fp8_export_reads_the_hydra_config(runs, tmp_path):
    """The run's .hydra/config.yaml tells the exporter the quant group; --unquantized bf16 dequantizes the rest."""
    overrides = TINY + FORMATS["fp8"]
    run_dir = tmp_path / "run"
    shutil.copytree(runs("fp8", 1), run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(make_cfg(FAST + overrides), run_dir / ".hydra" / "config.yaml")
    (run_dir / "hf_quant_config.json").unlink()  # so only .hydra can tell the exporter the quant group
    out = export_run(run_dir, tmp_path / "hf", unquantized="bf16", progress=False)
    tensors = read_export(out)
    model, linears, amax = calibrated_model(run_dir, overrides)
    quantized = {n: m for n, m in linears.items() if m.weight_quantizer.is_enabled}
    assert quantized and all(".attn." not in n for n in quantized)  # FP8 preset: attention stays unquantized
    with torch.no_grad():
        for name in ("layers.0.ffn.w1", "layers.2.ffn.experts.7.w2"):
            codes = tensors[f"{hf(name)}.weight"]
            expected = linears[name].weight_quantizer(linears[name].dequantized_weight())
            assert torch.equal(decode_fp8(codes, amax[f"{name}.weight_quantizer._amax"]), expected), name
        wq_a = linears["layers.1.attn.wq_a"]
        assert torch.equal(tensors["model.layers.1.self_attn.q_a_proj.weight"], wq_a.dequantized_weight())
    assert "model.layers.1.self_attn.q_a_proj.weight_scale_inv" not in tensors
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == FP8 and "model.layers.1.self_attn.o_proj" in quant["exclude_modules"]


def broken_copy(run_dir: Path, dst: Path, edit) -> Path:
    shutil.copytree(run_dir, dst)
    for path in (dst / "amax").glob("*.pt"):
        amax = torch.load(path)
        edit(amax)
        torch.save(amax, path)
    return dst


@pytest.mark.slow  # run_w2: two spawned ranks
def test_refuses_missing_amax_and_bad_scales(run_w2, tmp_path):
    def edit(amax):
        amax.pop("layers.2.ffn.experts.5.w2.input_quantizer._amax", None)  # held by rank 0 only
        amax.pop("layers.0.ffn.w2.input_quantizer._amax", None)  # tensor-parallel: on both ranks
        if "layers.3.attn.wo.weight_quantizer._amax" in amax:
            amax["layers.3.attn.wo.weight_quantizer._amax"].zero_()
        if "layers.1.ffn.experts.12.w3.input_quantizer._amax" in amax:  # rank 1's expert
            amax["layers.1.ffn.experts.12.w3.input_quantizer._amax"].fill_(float("nan"))

    run_dir = broken_copy(run_w2, tmp_path / "run", edit)
    with pytest.raises(UserError) as err:
        export_run(run_dir, tmp_path / "hf", progress=False)
    message = str(err.value)
    # Every module, in order; w1 shares w3's NaN input amax (one fused input scale), so it is refused too.
    order = ["layers.0.ffn.w2 (no input amax)", "layers.1.ffn.experts.12.w1 (input scale nan",
             "layers.1.ffn.experts.12.w3 (input scale nan", "layers.2.ffn.experts.5.w2 (no input amax)",
             "layers.3.attn.wo (weight scale 0.0"]
    positions = [message.find(o) for o in order]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), message
    assert message.startswith("5 quantized modules cannot be exported")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


def test_cli_exits_nonzero_with_the_message(run_w1, tmp_path):
    run_dir = broken_copy(run_w1, tmp_path / "run",
                          lambda a: a.pop("layers.1.ffn.shared_experts.w2.input_quantizer._amax"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "deepseek_ptq.export", str(run_dir), "--out", str(tmp_path / "hf")],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert "layers.1.ffn.shared_experts.w2 (no input amax)" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "hf").exists()


def test_refuses_unfinished_runs_and_used_outputs(run_w1, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run_w1, run_dir)
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty folder"):
        export_run(run_dir, used, progress=False)
    assert (used / "keep.txt").read_text() == "mine"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "status": "failed"}))
    with pytest.raises(UserError, match="status 'failed'"):
        export_run(run_dir, tmp_path / "hf", progress=False)


def test_refuses_negative_amax(run_w1, tmp_path):
    def edit(amax):
        amax["layers.1.ffn.experts.2.w2.input_quantizer._amax"].neg_()
        amax["layers.3.attn.wo.weight_quantizer._amax"].neg_()

    with pytest.raises(UserError) as err:
        export_run(broken_copy(run_w1, tmp_path / "run", edit), tmp_path / "hf", progress=False)
    message = str(err.value)
    assert message.startswith("2 quantized modules cannot be exported"), message
    assert "layers.1.ffn.experts.2.w2 (negative input amax -" in message
    assert "layers.3.attn.wo (negative weight amax -" in message
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_refuses_weight_amax_its_scales_cannot_represent(runs, tmp_path, fmt):
    """A weight amax below the weight's own max (NVFP4 block scales past 448, FP8 codes clipped) or so far above
    it that every scale is 0: every such module listed, after every weight was read; nothing left behind."""
    below, above = "layers.0.ffn.w2", "layers.2.ffn.experts.9.w2"

    def edit(amax):
        amax[f"{below}.weight_quantizer._amax"].mul_(0.5)
        amax[f"{above}.weight_quantizer._amax"].mul_(1e6)

    with pytest.raises(UserError) as err:
        export_run(broken_copy(runs(fmt, 1), tmp_path / "run", edit), tmp_path / "hf", progress=False)
    message = str(err.value)
    assert message.startswith("2 quantized modules cannot be exported, their calibrated scales cannot represent "
                              "their weights"), message
    assert f"{below} (weight amax" in message and "below the weight's own max" in message
    assert f"{above} (weight amax" in message and "every scale of the weight underflows to 0" in message
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


SOFTMAX = ["model.score_func=softmax", "model.gate_bias=false"]  # the V2 family's routing (DeepSeek-V2, V2-Lite)


@pytest.fixture(scope="module")
def softmax_export(tmp_path_factory, cache_dir) -> Path:
    run_dir = run_job(tmp_path_factory.mktemp("softmax"), TINY + SOFTMAX)
    return export_run(run_dir, tmp_path_factory.mktemp("softmax_hf") / "hf", progress=False)


def test_softmax_routed_models_export_as_deepseek_v2(softmax_export, exports):
    """transformers' and vLLM's V3 classes route with sigmoid scores whatever scoring_func says: a softmax-routed
    model is named DeepseekV2ForCausalLM, with the fields its router reads."""
    config = json.loads((softmax_export / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV2ForCausalLM"] and config["model_type"] == "deepseek_v2"
    assert (config["scoring_func"], config["topk_method"], config["norm_topk_prob"]) == ("softmax", "group_limited_greedy",
                                                                                        False)
    assert (config["n_group"], config["topk_group"], config["routed_scaling_factor"]) == (4, 2, 2.5)
    assert not [k for k in read_export(softmax_export) if "e_score_correction_bias" in k]  # V2 has no selection bias
    v3 = json.loads((exports[1] / "config.json").read_text())
    assert (v3["architectures"], v3["model_type"], v3["scoring_func"]) == (["DeepseekV3ForCausalLM"], "deepseek_v3",
                                                                           "sigmoid")


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_export_files_follow_the_umask(run_w1, tmp_path, mask):
    """A server running as another user reads the export: 0644 files in a 0755 folder by default (the umask's)."""
    import stat

    previous = os.umask(mask)
    try:
        out = export_run(run_w1, tmp_path / "hf", max_shard_bytes=2_000_000, progress=False)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert {"config.json", "hf_quant_config.json", "model.safetensors.index.json"} <= set(modes)
    assert {n: oct(m) for n, m in modes.items() if m != 0o666 & ~mask} == {}
