"""A loader this project did not write: transformers' DeepSeek classes load the export, decoded by the test.

The export's quantized weights are decoded here (NVFP4: E2M1 code x block scale x weight_scale_2; FP8: code x
weight_scale; decoders in test_export.py, written independently of the exporter) into a bf16 copy without
quantization_config, which ``AutoModelForCausalLM`` loads. Its logits, computed in float32, are compared with the
project's own model holding the evaluated model's fake-quantized weights, also in float32: the same weights (bit for
bit, test_export.py) through two implementations of the architecture, so they agree to float32 rounding. Activations
are unquantized on both sides: transformers has no NVFP4/FP8 activation quantization for these checkpoints (the
input scales are checked against the evaluated input amax in test_export.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_job
from safetensors.torch import save_file
from test_export import FORMATS, SOFTMAX, TINY, calibrated_model, decode_nvfp4, hf, read_export

from deepseek_ptq.hf.export import export_run
from deepseek_ptq.model.parallel import Linear, Parallel
from deepseek_ptq.model.transformer import Transformer

transformers = pytest.importorskip("transformers")  # a test dependency (pip install ".[test]"), pinned in pyproject


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def decode_copy(export: Path, out: Path) -> Path:
    """The export with every quantized weight decoded to bf16 and its scales dropped: plain Hugging Face weights."""
    tensors = read_export(export)
    decoded: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        module, _, param = name.rpartition(".")
        if param in ("weight_scale", "weight_scale_2", "input_scale"):
            continue
        if f"{module}.weight_scale_2" in tensors:  # NVFP4
            tensor = decode_nvfp4(tensor, tensors[f"{module}.weight_scale"], tensors[f"{module}.weight_scale_2"])
        elif f"{module}.weight_scale" in tensors:  # FP8 per tensor: code x scale, the way modelopt rounds it
            # (code x (1 / (448 / amax)), amax = weight_scale x 448): code x weight_scale rounded to bf16 differs
            # from it by one bf16 ulp in 0.6% of the tiny model's FP8 weights; engines scale in float32 anyway.
            amax = tensors[f"{module}.weight_scale"].float() * 448
            tensor = (tensor.float() * (1 / (448.0 / amax))).to(torch.bfloat16)
        decoded[name] = tensor
    out.mkdir()
    save_file(decoded, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((export / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    return out


def project_model_fp32(model: torch.nn.Module, linears: dict[str, torch.nn.Module]) -> Transformer:
    """The project's architecture in float32 holding the evaluated weights: each quantized linear's
    ``weight_quantizer(dequantized_weight())``, every other tensor as the calibrated model holds it."""
    args = dataclasses.replace(model.args, dtype="bf16")
    plain = Transformer(args, Parallel())
    state = {k: v for k, v in model.state_dict().items() if "_quantizer" not in k and not k.endswith(".scale")}
    with torch.no_grad():
        for name, module in linears.items():
            weight = module.dequantized_weight()
            state[f"{name}.weight"] = module.weight_quantizer(weight) if module.weight_quantizer.is_enabled else weight
    plain.load_state_dict(state, assign=True, strict=True)
    for m in plain.modules():
        if isinstance(m, Linear):
            m.compute_dtype = torch.float32
    return plain.float().eval()


def compare(fmt_overrides: list[str], tmp_path: Path, max_seq_len: int | None = None) -> dict[str, float]:
    overrides = TINY + fmt_overrides + ([f"model.max_seq_len={max_seq_len}"] if max_seq_len else [])
    run_dir = run_job(tmp_path / "run", overrides)
    export = export_run(run_dir, tmp_path / "hf", unquantized="bf16", progress=False)
    model, linears, _ = calibrated_model(run_dir, overrides)
    ours = project_model_fp32(model, linears)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(decode_copy(export, tmp_path / "decoded"),
                                                              dtype=torch.float32).eval()
    from safetensors.torch import load_file

    decoded, own = load_file(str(tmp_path / "decoded" / "model.safetensors")), ours.state_dict()
    for name, module in linears.items():  # the loaded weights are the evaluated ones, bit for bit
        if module.weight_quantizer.is_enabled:
            assert torch.equal(decoded[f"{hf(name)}.weight"].float(), own[f"{name}.weight"]), name
    tokens = torch.randint(0, model.args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(tokens), theirs(tokens).logits.float()
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
    figures = {"max_abs": float((a - b).abs().max()), "max_logit": float(a.abs().max()), "kl": float(kl) / 64,
               "top1": float((a.argmax(-1) == b.argmax(-1)).float().mean()), "architecture": theirs.config.architectures[0]}
    logging.getLogger(__name__).warning("transformers vs project (%s): %s", fmt_overrides, figures)
    return figures


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_transformers_loads_the_decoded_export(tmp_path, cache_dir, fmt):
    figures = compare(FORMATS[fmt], tmp_path)
    assert figures["architecture"] == "DeepseekV3ForCausalLM"
    assert figures["max_abs"] <= 1e-4 * max(1.0, figures["max_logit"]), figures  # float32 rounding, not a model change
    assert figures["top1"] == 1.0


def test_transformers_routes_a_softmax_model_as_deepseek_v2(tmp_path, cache_dir):
    figures = compare(SOFTMAX, tmp_path)
    assert figures["architecture"] == "DeepseekV2ForCausalLM"
    assert figures["max_abs"] <= 1e-4 * max(1.0, figures["max_logit"]), figures


@pytest.mark.parametrize("max_seq_len", [2048, 8192])
def test_the_rotary_transformers_runs_is_the_calibrated_one(tmp_path, cache_dir, max_seq_len):
    """Either side of original_seq_len: the exported config's YaRN is what the model ran (transformers computes it
    from config.json alone)."""
    figures = compare([], tmp_path, max_seq_len)
    assert figures["max_abs"] <= 1e-4 * max(1.0, figures["max_logit"]), figures


def test_a_quantized_export_given_straight_to_transformers_is_not_loaded_as_such(run_w1_fp8, tmp_path, caplog):
    """transformers has no loader for modelopt checkpoints: it says so (``Unknown quantization type``) and skips
    the quantization, so the FP8 codes would load without their scales (README: decode first, or serve with an
    engine)."""
    export = export_run(run_w1_fp8, tmp_path / "hf", progress=False)
    index = json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.0.gate_proj.weight_scale" in index and \
        "model.layers.1.mlp.experts.0.gate_proj.input_scale" in index  # the index lists the scales too
    logger = logging.getLogger("transformers.quantizers.auto")
    logger.addHandler(caplog.handler)
    try:
        transformers.AutoConfig.from_pretrained(export)
        from transformers.quantizers.auto import AutoHfQuantizer

        supported = AutoHfQuantizer.supports_quant_method(json.loads((export / "config.json").read_text())["quantization_config"])
    finally:
        logger.removeHandler(caplog.handler)
    assert supported is False and "Unknown quantization type, got modelopt" in caplog.text


@pytest.fixture
def run_w1_fp8(tmp_path, cache_dir) -> Path:
    run_dir = run_job(tmp_path / "fp8", TINY + FORMATS["fp8"])
    yield run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
