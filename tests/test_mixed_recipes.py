"""Mixed recipes on the tiny default: quant=nvfp4_experts (routed experts NVFP4, every other linear left in the
checkpoint's FP8 blocks), quant=nvfp4_routed_fp8_shared (quant=nvfp4 with FP8 per-tensor shared experts), and the
quant.overrides list they are made of.

Each option calibrates, evaluates and exports. The export's per-module formats (its decoded tensors, their scales
and the hf_quant_config.json entries) are checked against the quantizers modelopt itself put into the run's model
(rebuilt at W = 1 with the run's config and amax: enabled or not, num_bits and block sizes of each linear's
weight quantizer), and against the amax the run saved; the linears left in FP8 blocks against the source
checkpoint's bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_cfg, run_job
from safetensors import safe_open
from test_export import calibrated_model, decode_fp8, decode_nvfp4, hf, read_export

from deepseek_ptq.errors import UserError
from deepseek_ptq.hf.export import Run, export_run, hf_quant_config
from deepseek_ptq.hf.formats import module_formats
from deepseek_ptq.model.load import PACKAGE_DIR, build_model, checkpoint_dir, resolve_args
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.pipeline.validate import validate
from deepseek_ptq.quant.calibrate import insert_quantizers
from deepseek_ptq.quant.modules import quantized_linears
from deepseek_ptq.quant.recipes import build_quant_config, model_linears

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OPTIONS = ["nvfp4_experts", "nvfp4_routed_fp8_shared"]
EVAL = ["eval.enabled=true", "eval.num_samples=2"]
SOURCE = PACKAGE_DIR / "tiny" / "model0-mp1.safetensors"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    made: dict[str, Path] = {}

    def run(option: str) -> Path:
        if option not in made:
            made[option] = run_job(tmp_path_factory.mktemp(option), [f"quant={option}", *EVAL])
        return made[option]
    return run


@pytest.fixture(scope="module")
def exported(tmp_path_factory, runs):
    made: dict[str, Path] = {}

    def export(option: str) -> Path:
        if option not in made:
            out = tmp_path_factory.mktemp("exports") / option
            made[option] = export_run(runs(option), out, max_shard_bytes=2_000_000, progress=False)
        return made[option]
    return export


def quantizer_format(q) -> str | None:
    """NVFP4, FP8 (per tensor) or None (disabled), read off a modelopt quantizer."""
    if not q.is_enabled:
        return None
    blocks = q.block_sizes or {}
    if tuple(q.num_bits) == (2, 1) and blocks.get(-1) == 16 and blocks.get("type") == "dynamic":
        return "NVFP4"
    if tuple(q.num_bits) == (4, 3) and not blocks and q.axis is None:
        return "FP8"
    raise AssertionError(f"unexpected quantizer {q}")


def expected_format(option: str, name: str) -> str | None:
    """What each option means, literally (README, "Mixed precision")."""
    if ".ffn.experts." in name:
        return "NVFP4"
    if option == "nvfp4_experts":
        return None
    if ".ffn.shared_experts." in name:
        return "FP8"
    return "NVFP4" if ".ffn." in name or name.endswith(".attn.wo") else None


def source_tensors() -> dict[str, torch.Tensor]:
    with safe_open(str(SOURCE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("option", OPTIONS)
def test_option_calibrates_evaluates_and_exports(runs, exported, option):
    metrics = json.loads((runs(option) / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["quant"] == option
    assert math.isfinite(metrics["eval"]["kl"]) and metrics["eval"]["kl"] > 0
    assert 0 < metrics["eval"]["top1_agreement"] <= 1
    quant = json.loads((exported(option) / "hf_quant_config.json").read_text())["quantization"]
    inline = json.loads((exported(option) / "config.json").read_text())["quantization_config"]
    assert quant["quant_algo"] == inline["quant_algo"] == "MIXED_PRECISION"
    assert inline["quantized_layers"] == quant["quantized_layers"] and inline["ignore"] == quant["exclude_modules"]


def test_run_directory_says_which_formats_are_mixed(runs):
    record = json.loads((runs("nvfp4_routed_fp8_shared") / "hf_quant_config.json").read_text())["quantization"]
    assert record["quant_algo"] == "MIXED_PRECISION" and record["base_quant_algo"] == "NVFP4"
    assert record["overrides"] == [{"pattern": "*.ffn.shared_experts.*", "format": "fp8"}]
    experts = json.loads((runs("nvfp4_experts") / "hf_quant_config.json").read_text())["quantization"]
    assert experts["quant_algo"] == "MIXED_PRECISION" and [o["format"] for o in experts["overrides"]] == ["fp8_block", "nvfp4"]
    plain = json.loads((runs("nvfp4") / "hf_quant_config.json").read_text())["quantization"]
    assert plain["quant_algo"] == "NVFP4" and "overrides" not in plain


@pytest.mark.parametrize("option", OPTIONS)
def test_export_formats_match_the_runs_quantizers(runs, exported, option):
    run_dir = runs(option)
    tensors = read_export(exported(option))
    quant = json.loads((exported(option) / "hf_quant_config.json").read_text())["quantization"]
    layers, excluded = quant["quantized_layers"], set(quant["exclude_modules"])
    source = source_tensors()
    model, linears, amax = calibrated_model(run_dir, [f"quant={option}"])
    formats = {name: quantizer_format(m.weight_quantizer) for name, m in linears.items()}
    assert formats == {name: expected_format(option, name) for name in linears}
    # The run's own amax: exactly the enabled quantizers have one.
    assert {k.rsplit(".", 2)[0] for k in amax} == {n for n, f in formats.items() if f}
    assert "lm_head" in excluded and "lm_head" not in layers and tensors["lm_head.weight"].dtype == torch.bfloat16
    stored = set()
    with torch.no_grad():
        for name, module in linears.items():
            if name == "head":
                continue
            p, fmt = hf(name), formats[name]
            assert quantizer_format(module.input_quantizer) == fmt, name  # weights and activations alike
            if fmt is None:
                if option == "nvfp4_experts":  # left in the stored FP8 blocks, declared so
                    assert layers[p] == {"quant_algo": "FP8_BLOCK_SCALES", "group_size": 128} and p not in excluded
                    stored.add(name)
                else:  # left unquantized: bf16 and excluded, as the export writes every such linear
                    assert p not in layers and p in excluded
                    assert tensors[f"{p}.weight"].dtype == torch.bfloat16
                continue
            assert p not in excluded
            weight, scale, input_scale = (tensors[f"{p}.{k}"] for k in ("weight", "weight_scale", "input_scale"))
            weight_amax = amax[f"{name}.weight_quantizer._amax"].float()
            input_amax = amax[f"{name}.input_quantizer._amax"].float()
            expected = module.weight_quantizer(module.dequantized_weight())
            if fmt == "NVFP4":
                assert layers[p] == {"quant_algo": "NVFP4", "group_size": 16}
                out_f, in_f = module.weight.shape
                assert (weight.dtype, tuple(weight.shape)) == (torch.uint8, (out_f, in_f // 2))
                assert (scale.dtype, tuple(scale.shape)) == (torch.float8_e4m3fn, (out_f, in_f // 16))
                assert torch.equal(decode_nvfp4(weight, scale, tensors[f"{p}.weight_scale_2"]), expected), name
                assert torch.equal(input_scale, input_amax / 2688)
            else:
                assert layers[p] == {"quant_algo": "FP8"}
                assert weight.dtype == torch.float8_e4m3fn and weight.shape == module.weight.shape
                assert f"{p}.weight_scale_2" not in tensors and scale.shape == torch.Size([])
                assert torch.equal(decode_fp8(weight, weight_amax), expected), name
                assert torch.equal(scale, weight_amax / 448) and torch.equal(input_scale, input_amax / 448)
            assert f"{p}.weight_scale_inv" not in tensors
    # Every exported linear entry is one of the model's linears; nothing else is declared quantized.
    assert set(layers) == {hf(n) for n, f in formats.items() if f} | {hf(n) for n in stored}
    if option == "nvfp4_experts":
        assert len(stored) == len(linears) - 1 - 144  # all but the head and the 3 x 16 x 3 routed expert linears
        for name in stored:  # byte for byte what the source checkpoint stores
            for ours, theirs in (("weight", "weight"), ("weight_scale_inv", "scale")):
                got, want = tensors[f"{hf(name)}.{ours}"], source[f"{name}.{theirs}"]
                assert got.dtype == want.dtype and got.shape == want.shape
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (name, ours)
    del model


def test_routed_experts_only_in_bf16_is_one_format():
    """Without the stored blocks (the rest left to --unquantized, bf16 by default) the export is plain NVFP4 with
    exclude_modules, the form every engine reads (README, "Mixed precision")."""
    cfg = make_cfg(["quant=nvfp4_experts", "quant.overrides=[]"])
    args = resolve_args(cfg.model)
    linears = model_linears(args) + ["head"]
    formats = module_formats(build_quant_config(cfg.quant, on_cpu=False), linears, cfg.quant.preset)
    assert {n for n, f in formats.items() if f} == {n for n in linears if ".ffn.experts." in n}
    assert set(formats.values()) == {"NVFP4", None}
    quant = hf_quant_config(Run(Path("."), Path("."), 1, args, cfg.quant), formats, linears)["quantization"]
    assert quant["quant_algo"] == "NVFP4" and quant["group_size"] == 16 and "quantized_layers" not in quant
    assert "model.layers.1.mlp.shared_experts.gate_proj" in quant["exclude_modules"]


def test_overrides_apply_in_order_last_wins(cache_dir):
    """modelopt's conversion with an override list: the later entry wins where both match."""
    cfg = make_cfg(['quant.overrides=[{pattern:"*",format:fp8},{pattern:"*layers.0.*",format:none},'
                    '{pattern:"layers.0.attn.wo",format:nvfp4}]'])
    validate(cfg)
    args = resolve_args(cfg.model)
    model = build_model(args, checkpoint_dir(cfg.model, args, 1), Parallel(), torch.device("cpu"), progress=False)
    insert_quantizers(model, build_quant_config(cfg.quant, on_cpu=True))
    formats = {n: (quantizer_format(m.weight_quantizer), quantizer_format(m.input_quantizer))
               for n, m in quantized_linears(model)}
    for name, (weight, act) in formats.items():
        want = ("NVFP4" if name == "layers.0.attn.wo" else None if name.startswith("layers.0.") or name == "head"
                else "FP8")
        assert weight == act == want, name


BAD_OVERRIDES = {
    "pattern matching no linear": ('[{pattern:"*layers.9.*",format:fp8}]', ["'*layers.9.*'", "matches no linear",
                                                                           "layers.0.attn.wq_a"]),
    "the head": ('[{pattern:"head",format:fp8}]', ["'head'", "matches no linear", "never overridden"]),
    "no format": ('[{pattern:"*"}]', ["quant.overrides[0] has no format", "fp8_block"]),
    "fused pair split": ('[{pattern:"*.w3",format:fp8}]', ["layers.0.ffn.w1", "layers.0.ffn.w3", "one GEMM",
                                                          "same format"]),
    "stored blocks of a bf16 model": ('[{pattern:"*.attn.*",format:fp8_block}]', ["fp8_block", "bf16",
                                                                                  "format: none"]),
}


@pytest.mark.parametrize("case", list(BAD_OVERRIDES))
def test_bad_overrides_are_refused_before_any_weight(cache_dir, case):
    value, words = BAD_OVERRIDES[case]
    extra = ["model=tiny_random", "model.dtype=bf16"] if "bf16" in case else []
    with pytest.raises(UserError) as err:
        validate(make_cfg([*extra, f"quant.overrides={value}"]))
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_an_unknown_format_is_refused_by_the_schema():
    with pytest.raises(Exception, match="fp9|OverrideFormat"):
        make_cfg(['quant.overrides=[{pattern:"*",format:fp9}]'])
