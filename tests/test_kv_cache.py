"""The FP8 MLA KV cache (quant.kv_cache=fp8): what engines cache is calibrated, evaluated and exported.

The cache of a token is its normalized kv latent and its rotary key (model/attention.py, ``cache_entries``); with
quant.kv_cache=fp8 each gets an FP8 E4M3 per-tensor quantizer (quant/modules.py, QuantMLA), max-calibrated, and the
two share one amax (engines scale the concatenated row with one ``k_scale``). Without it the quantizers are off and
the attention reads its inputs unchanged. The references here are recomputed from the unquantized model's own cache
entries and modelopt's FP8 arithmetic written out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, load_amax, make_cfg, run_job
from safetensors import safe_open
from test_cli import metrics
from test_export import read_export
from test_layerwise import EVAL, assert_same_run

from deepseek_ptq.errors import UserError
from deepseek_ptq.hf.export import export_run
from deepseek_ptq.model.load import build_model, checkpoint_dir, resolve_args
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.pipeline.validate import validate
from deepseek_ptq.quant.calibrate import calibrate
from deepseek_ptq.quant.engine_constraints import apply_engine_constraints
from deepseek_ptq.quant.recipes import build_quant_config

TINY = ["model=tiny_random"]
KV = ["quant.kv_cache=fp8"]
CPU = torch.device("cpu")
LAYERS = 4  # tiny_random


def kv_keys(layer: int) -> tuple[str, str]:
    return (f"layers.{layer}.attn.kv_bmm_quantizer._amax", f"layers.{layer}.attn.pe_bmm_quantizer._amax")


def fp8_fake(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """modelopt's FP8 fake quantization written out: x * (448 / amax), clamped, E4M3, times 1 / (448 / amax)."""
    scale = 448.0 / amax.float()
    return ((x.float() * scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * (1 / scale)).to(x.dtype)


def tiny_model(overrides: list[str]):
    cfg = make_cfg(FAST + TINY + overrides)
    args = resolve_args(cfg.model)
    model = build_model(args, checkpoint_dir(cfg.model, args, 1), Parallel(), CPU, progress=False)
    return cfg, args, model.eval()


def record_cache_entries(model: torch.nn.Module) -> dict[int, list[tuple[torch.Tensor, ...]]]:
    """Each layer's calls of ``cache_entries``: (latent, rotary key, what attention reads back of each)."""
    seen: dict[int, list[tuple[torch.Tensor, ...]]] = {}
    for i, layer in enumerate(model.layers):
        def record(kv, pe, i=i, entries=layer.attn.cache_entries):
            out = entries(kv, pe)
            seen.setdefault(i, []).append((kv, pe, *out))
            return out
        layer.attn.cache_entries = record  # an instance attribute: the class's method stays as it is
    return seen


def batches(vocab: int, n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (2, 32), generator=g) for _ in range(n)]


@torch.no_grad()
def test_amax_are_the_cache_entries_max_and_shared(cache_dir):
    """Calibrated amax = max |latent| and max |rotary key| of the unquantized model over the batches; the engine
    constraint then gives both the larger."""
    _, args, plain = tiny_model([])
    seen = record_cache_entries(plain)
    data = batches(args.vocab_size)
    for tokens in data:
        plain(tokens)
    cfg, _, model = tiny_model(KV)
    calibrate(model, build_quant_config(cfg.quant, on_cpu=True), data, False, CPU, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_amax")}
    sources = apply_engine_constraints(model)
    after = model.state_dict()
    for layer in range(LAYERS):
        latent = torch.stack([kv.abs().max() for kv, *_ in seen[layer]]).max()
        rope = torch.stack([pe.abs().max() for _, pe, *_ in seen[layer]]).max()
        kv_key, pe_key = kv_keys(layer)
        assert torch.equal(before[kv_key], latent) and torch.equal(before[pe_key], rope), layer
        assert torch.equal(after[kv_key], torch.maximum(latent, rope)) and torch.equal(after[pe_key], after[kv_key])
        raised = kv_key if latent < rope else pe_key
        assert sources.get(raised.removesuffix("._amax")) == "fused_max" or latent == rope
    # Only the values it reports raised changed (the KV pairs among the fused linears' pairs).
    assert {k.removesuffix("._amax") for k, v in before.items() if not torch.equal(after[k], v)} == set(sources)


@torch.no_grad()
def test_attention_reads_the_fake_quantized_cache(cache_dir):
    """Enabled: every entry attention reads back is modelopt's FP8 fake quantization of the cache with the shared
    amax, and wkv_b (keys and values) takes that latent; off: the entries come back unchanged."""
    cfg, args, model = tiny_model(KV)
    data = batches(args.vocab_size)
    calibrate(model, build_quant_config(cfg.quant, on_cpu=True), data, False, CPU, progress=False)
    apply_engine_constraints(model)
    amax = model.state_dict()
    seen = record_cache_entries(model)
    wkv_b_inputs: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.layers):
        layer.attn.wkv_b.register_forward_pre_hook(lambda _m, inputs, i=i: wkv_b_inputs.__setitem__(i, inputs[0]))
    quantized = model(data[0])
    changed = 0
    for layer in range(LAYERS):
        (kv, pe, kv_read, pe_read), = seen[layer]
        shared = amax[kv_keys(layer)[0]]
        assert torch.equal(kv_read, fp8_fake(kv, shared)) and torch.equal(pe_read, fp8_fake(pe, shared))
        assert wkv_b_inputs[layer] is kv_read
        changed += int(not torch.equal(kv_read, kv)) + int(not torch.equal(pe_read, pe))
    assert changed == 2 * LAYERS  # FP8 rounds some entries of every latent and rotary key
    # The rotary key's quantization reaches the attention output too (not only the latent's).
    for layer in model.layers:
        layer.attn.pe_bmm_quantizer.disable()
    assert not torch.equal(model(data[0]), quantized)

    cfg, _, off = tiny_model([])
    calibrate(off, build_quant_config(cfg.quant, on_cpu=True), data, False, CPU, progress=False)
    seen = record_cache_entries(off)
    off(data[0])
    assert all(not q.is_enabled for layer in off.layers for q in (layer.attn.kv_bmm_quantizer, layer.attn.pe_bmm_quantizer))
    assert all(kv_read is kv and pe_read is pe for layer in range(LAYERS) for kv, pe, kv_read, pe_read in seen[layer])
    assert not any("_bmm_" in k for k in off.state_dict())  # no amax: nothing saved, exported or compared


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """The tiny_random run with eval, with and without the FP8 KV cache, made once (``fast``: calib.fast)."""
    made: dict[str, Path] = {}

    def run(name: str, overrides: list[str]) -> Path:
        if name not in made:
            made[name] = run_job(tmp_path_factory.mktemp(name), TINY + EVAL + overrides)
        return made[name]
    return run


def test_plain_and_streamed_calibration_give_the_resident_amax(runs):
    fast = runs("kv", KV)
    plain = runs("kv_plain", [*KV, "calib.fast=false"])
    streamed = runs("kv_streamed", [*KV, "calib.layerwise=true"])
    a, b = load_amax(fast), load_amax(plain)
    assert a.keys() == b.keys() and all(k in a for layer in range(LAYERS) for k in kv_keys(layer))
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert_same_run(fast, streamed)  # every amax, amax.csv (the KV rows too) and the evaluation, bit for bit
    rows = (streamed / "stats" / "amax.csv").read_text().splitlines()
    kv_rows = [r.split(",") for r in rows if "_bmm_quantizer" in r]
    assert len(kv_rows) == 2 * LAYERS and {r[3] for r in kv_rows} == {"attn.kv_cache"}  # kind
    assert {r[5] for r in kv_rows} == {"kv_bmm", "pe_bmm"} and "fused_max" in {r[8] for r in kv_rows}


def test_evaluation_includes_the_cache(runs):
    """Calibration only observes (every other amax is the run's without the KV cache); the evaluation's
    quantized model reads the FP8 cache, so its scores differ."""
    with_kv, without = runs("kv", KV), runs("no_kv", [])
    a, b = load_amax(with_kv), load_amax(without)
    assert set(a) - set(b) == {k for layer in range(LAYERS) for k in kv_keys(layer)}
    assert all(torch.equal(a[k], b[k]) for k in b)
    ea, eb = metrics(with_kv)["eval"], metrics(without)["eval"]
    assert ea["tokens"] == eb["tokens"] and ea["bpb_ref"] == eb["bpb_ref"]  # the same reference model and data
    assert ea["kl"] != eb["kl"] and ea["bpb_quant"] != eb["bpb_quant"]


def kv_scales_of(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_export(out).items() if k.endswith((".k_scale", ".v_scale"))}


def check_exported_scales(run_dir: Path, out: Path) -> None:
    """k_scale = v_scale = the layer's shared amax / 448, float32 [], listed in the index; FP8 KV in both configs."""
    amax, scales = load_amax(run_dir), kv_scales_of(out)
    assert len(scales) == 2 * LAYERS
    for layer in range(LAYERS):
        kv, pe = (amax[k] for k in kv_keys(layer))
        assert torch.equal(kv, pe)  # the run shared them before it evaluated
        for name in (f"model.layers.{layer}.self_attn.k_proj.k_scale", f"model.layers.{layer}.self_attn.v_proj.v_scale"):
            assert scales[name].dtype == torch.float32 and scales[name].shape == ()
            assert torch.equal(scales[name], kv.float() / 448)  # float32, as engines divide by it
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["kv_cache_quant_algo"] == "FP8"
    scheme = json.loads((out / "config.json").read_text())["quantization_config"]["kv_cache_scheme"]
    assert scheme == {"dynamic": False, "num_bits": 8, "type": "float"}  # what vLLM and SGLang read as FP8


def test_export_writes_the_scales_engines_read(runs, tmp_path):
    run_dir = runs("kv", KV)
    out = export_run(run_dir, tmp_path / "hf", max_shard_bytes=2_000_000, progress=False)
    check_exported_scales(run_dir, out)
    # As a loader reads the file header (vLLM's default_weight_loader fills a one-element parameter from it).
    name = "model.layers.0.self_attn.k_proj.k_scale"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(out / index[name]), framework="pt") as f:
        assert f.get_slice(name).get_shape() == [] and f.get_slice(name).get_dtype() == "F32"
    assert not kv_scales_of(export_run(runs("no_kv", []), tmp_path / "hf_no_kv", progress=False))


@pytest.mark.slow  # two spawned ranks
def test_two_ranks_share_one_kv_amax_and_export_it(runs, tmp_path):
    run_dir = runs("kv_w2", [*KV, "parallel=mp2"])
    ranks = [torch.load(p) for p in sorted((run_dir / "amax").glob("amax_dict_rank*-mp2.pt"))]
    assert len(ranks) == 2
    for layer in range(LAYERS):
        for key in kv_keys(layer):
            assert torch.equal(ranks[0][key], ranks[1][key])  # the fixup's one collective took the max over ranks
    check_exported_scales(run_dir, export_run(run_dir, tmp_path / "hf", progress=False))


def test_export_refuses_a_kv_run_without_kv_amax(runs, tmp_path):
    run_dir = tmp_path / "old"
    shutil.copytree(runs("kv", KV), run_dir)
    path = next((run_dir / "amax").glob("*.pt"))
    amax = torch.load(path)
    del amax[kv_keys(2)[1]]
    torch.save(amax, path)
    with pytest.raises(UserError, match=r"layers\.2\.attn \(no KV-cache amax"):
        export_run(run_dir, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_an_nvfp4_kv_cache_is_refused_before_any_rank(cache_dir):
    with pytest.raises(UserError, match="quant.kv_cache=nvfp4") as err:
        validate(make_cfg(["quant.kv_cache=nvfp4"]))
    assert "quant.kv_cache=fp8" in err.value.fix

