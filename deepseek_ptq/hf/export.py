"""Export a calibrated run as a Hugging Face DeepSeek-V3 checkpoint that serving engines load.

    python -m deepseek_ptq.hf.export RUN_DIR --out DIR [--max-shard-size 5GB] [--unquantized bf16|fp8]

Reads the run's amax dicts (any world size W) and its FP8 checkpoint, one module at a time, and writes
sharded safetensors with an index, config.json (with ``quantization_config``), hf_quant_config.json and the
tokenizer files. NVFP4 linears: packed uint8 weight, float8_e4m3fn ``weight_scale`` per 16 elements,
``weight_scale_2`` and ``input_scale`` = amax / (6 x 448); the linears engines fuse (w1/w3, wq_a/wkv_a) share
one weight amax and one input amax, the pair's max, applied in the run before its evaluation
(quant/engine_constraints.py). FP8 linears: float8_e4m3fn weight, ``weight_scale`` and ``input_scale`` = amax / 448. Linears
left unquantized are written in bf16 by default: that is the form of NVIDIA's public NVFP4 DeepSeek
checkpoints, and the engines' loaders for modelopt checkpoints treat excluded modules as plain bf16 linears.
``--unquantized fp8`` keeps the released FP8 blocks (``weight_scale_inv``) instead, for loaders that take them.
DeepSeek-V3.2's indexer is written in its stored form (wq_b, wk FP8 blocks; k_norm, weights_proj bf16) unless the
run quantized it (``quant.indexer=fp8``); its modules are listed in ``exclude_modules`` when left unquantized.
Linears a ``quant.overrides`` entry leaves in the stored FP8 blocks (``format: fp8_block``) are copied as stored
(``weight`` and ``weight_scale_inv``) and declared ``FP8_BLOCK_SCALES``. Modules of several formats make
``quant_algo: MIXED_PRECISION``, each quantized linear named in ``quantized_layers`` with its own algorithm.
A run with ``quant.kv_cache=fp8`` writes each layer's MLA KV-cache scale, the max of its latent and rotary-key amax
(the run shared it, quant/engine_constraints.py) over 448, float32 [], as ``self_attn.k_proj.k_scale`` and
``self_attn.v_proj.v_scale`` (hf/names.py, ``kv_cache_scale_names``).

A quantized module without an amax, or with a negative amax or a zero, NaN or infinite scale, stops the export
before anything is written (engines turn such checkpoints into NaN output); one whose weight amax is below the
weight's own max (its block scales or FP8 codes would saturate) or so far above it that every scale is 0 stops it
once every weight has been read, listing every such module. The output appears only when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from deepseek_ptq.common import natural_key
from deepseek_ptq.errors import UserError
from deepseek_ptq.files import atomic_output_dir, check_new_output, set_default_mode, write_json
from deepseek_ptq.hf.convert import TOKENIZER_FILES
from deepseek_ptq.hf.formats import CALIBRATED, FP8, FP8_BLOCK, NVFP4, module_formats, static_weight_fp8_max
from deepseek_ptq.hf.names import hf_config, hf_module, is_indexer, is_linear, kv_cache_scale_names, to_hf
from deepseek_ptq.hf.nvfp4_pack import (
    E4M3_MAX,
    fp8_scale,
    nvfp4_global_scale,
    pack_nvfp4,
    pack_nvfp4_static,
    quantize_fp8,
)
from deepseek_ptq.hf.safetensors_io import ShardedWriter
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.checkpoint import ShardReader, pick_world_size
from deepseek_ptq.model.kernels import dequant
from deepseek_ptq.pipeline import rundir
from deepseek_ptq.quant.engine_constraints import shared_amax

log = logging.getLogger(__name__)
# modelopt warns on import that transformers is missing; this export does not use its transformers code.
warnings.filterwarnings("ignore", message="Cannot find transformers package")
_AMAX = re.compile(r"^(.*)\.(weight|input)_quantizer\._amax$")
_KV_AMAX = re.compile(r"^layers\.(\d+)\.attn\.(kv|pe)_bmm_quantizer\._amax$")  # quant/modules.py, QuantMLA
_GLOBAL_AMAX = re.compile(r"^(.*)\.weight_quantizer\._global_amax$")  # static block scales' per-tensor amax


@dataclass
class Run:
    """What the export needs to know of a finished run."""

    run_dir: Path
    ckpt_dir: Path
    world_size: int
    args: ModelArgs
    quant_cfg: Any  # the run's quant group (DictConfig)


@dataclass
class ModuleScales:
    """One quantized linear's export: its format, the weight amax it is packed with, its activation scale."""

    fmt: str
    weight_amax: torch.Tensor  # per tensor (static block scales: their global amax)
    input_scale: torch.Tensor
    block_amax: torch.Tensor | None = None  # static block scales: one calibrated amax per 16-block
    fp8_max: float = E4M3_MAX  # what static block scales are normalized to (256: four-over-six)


def read_run(run_dir: Path) -> Run:
    """The run's config, world size and checkpoint, refusing runs that did not finish."""
    metrics = rundir.read_finished(run_dir)
    ckpt_dir = Path(metrics.ckpt_dir)
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if hydra_cfg.exists():
        from deepseek_ptq.model.load import resolve_args

        cfg = OmegaConf.load(hydra_cfg)
        quant_cfg, args = cfg.quant, resolve_args(cfg.model)
    else:  # runs started in-process (no Hydra output dir): the quant group is in hf_quant_config.json
        quant_json = run_dir / "hf_quant_config.json"
        if not quant_json.exists() or not (ckpt_dir / "config.json").exists():
            raise UserError(f"{run_dir} has neither .hydra/config.yaml nor hf_quant_config.json with "
                            f"{ckpt_dir}/config.json", fix="pass a complete run directory")
        quant_cfg = OmegaConf.create(json.loads(quant_json.read_text())["config"])
        args = ModelArgs.from_json(ckpt_dir / "config.json")
    return Run(run_dir, ckpt_dir, int(metrics.world_size), args, quant_cfg)


def merge_amax(run_dir: Path, world_size: int) -> dict[str, torch.Tensor]:
    """All ranks' amax in one dict: max over the ranks that hold a key (tensor-parallel shards agree after the fixup)."""
    merged = rundir.read_amax(run_dir, world_size)
    others = sorted(k for k in merged if not _AMAX.match(k) and not _KV_AMAX.match(k) and not _GLOBAL_AMAX.match(k))
    if others:
        raise UserError(f"the run holds quantizer state this export does not write: {', '.join(others[:3])}",
                        fix="export runs made with quant=nvfp4 or quant=fp8 (no AWQ pre-quant scales)")
    return merged


def _scale(fmt: str, amax: torch.Tensor) -> torch.Tensor:
    return nvfp4_global_scale(amax) if fmt == NVFP4 else fp8_scale(amax)


def _bad(scale: torch.Tensor) -> bool:
    return not bool(torch.isfinite(scale)) or float(scale) == 0.0


def plan_scales(formats: dict[str, str | None], amax: dict[str, torch.Tensor],
                static: dict[str, float] | None = None) -> dict[str, ModuleScales]:
    """Every quantized linear's scales, or one UserError listing every module that cannot be exported.

    ``static``: modules whose weights keep static block scales -> their FP8 normalization max
    (``formats.static_weight_fp8_max``); their weight amax is the global amax, beside the per-block amax."""
    static = static or {}
    quantized = {m for m, f in formats.items() if f in CALIBRATED}
    stray = sorted({m.group(1) for k in amax if (m := _AMAX.match(k) or _GLOBAL_AMAX.match(k))}
                   & (set(formats) - quantized), key=natural_key)
    if stray:
        raise UserError(f"the run holds amax for linears its quant config leaves unquantized: {', '.join(stray[:5])}",
                        fix="export the run with the config it was calibrated with (its .hydra/config.yaml)")

    amax = _engine_shared(amax, sorted(quantized, key=natural_key))

    def value(module: str, kind: str) -> torch.Tensor | None:
        key = "_global_amax" if kind == "weight" and module in static else "_amax"
        found = amax.get(f"{module}.{kind}_quantizer.{key}")
        return None if found is None else found.float().amax()

    problems: list[tuple[str, str]] = []
    plan = {}
    for module in sorted(quantized, key=natural_key):
        fmt = formats[module]
        weight_amax, input_amax = value(module, "weight"), value(module, "input")
        for kind, found in (("input", input_amax), ("weight", weight_amax)):
            if found is None:
                problems.append((module, f"no {kind} amax"))
            elif float(found) < 0:
                problems.append((module, f"negative {kind} amax {float(found)}"))
            elif _bad(_scale(fmt, found)):
                problems.append((module, f"{kind} scale {float(_scale(fmt, found))} from amax {float(found)}"))
        if weight_amax is not None and input_amax is not None:
            block = amax.get(f"{module}.weight_quantizer._amax") if module in static else None
            plan[module] = ModuleScales(fmt, weight_amax, _scale(fmt, input_amax), block, static.get(module, E4M3_MAX))
    if problems:
        raise _refusal(problems)
    return plan


def kv_cache_scales(quant_cfg: Any, amax: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """The FP8 KV-cache scale of every layer under the names engines read, or {} for a run without one; one
    UserError for every layer that cannot be exported."""
    from deepseek_ptq.quant.recipes import check_kv_cache

    layers = sorted({int(m.group(1)) for k in amax if (m := _KV_AMAX.match(k))})
    if check_kv_cache(quant_cfg) is None:
        if layers:
            raise UserError(f"the run holds KV-cache amax (layers {layers[:5]}) but its quant.kv_cache is unset",
                            fix="export the run with the config it was calibrated with (its .hydra/config.yaml)")
        return {}
    problems: list[tuple[str, str]] = []
    scales: dict[str, torch.Tensor] = {}
    for layer in range(n_layers):
        found = [amax.get(f"layers.{layer}.attn.{q}_bmm_quantizer._amax") for q in ("kv", "pe")]
        module = f"layers.{layer}.attn"
        if any(a is None for a in found):
            problems.append((module, "no KV-cache amax (a run made before quant.kv_cache=fp8 was calibrated)"))
            continue
        shared = torch.maximum(*(a.float().amax() for a in found))  # one scale for the latent and the rotary key
        scale = fp8_scale(shared)
        if float(shared) < 0 or _bad(scale):
            problems.append((module, f"KV-cache scale {float(scale)} from amax {float(shared)}"))
            continue
        for name in kv_cache_scale_names(layer):
            scales[name] = scale.clone()
    if problems:
        raise _refusal(problems, why="their KV cache has no usable FP8 scale",
                       fix="recalibrate with quant.kv_cache=fp8 (the run calibrates the cache), or unset it")
    return scales


def _engine_shared(amax: dict[str, torch.Tensor], quantized: list[str]) -> dict[str, torch.Tensor]:
    """The run's amax, fused pairs sharing the max (the run applied that rule before its evaluation: a run from
    before it did not, and its evaluation then describes another model than this export)."""
    shared = shared_amax(amax, quantized)
    differing = sorted({k.rsplit(".", 2)[0] for k in amax
                        if bool(torch.isfinite(shared[k]).all()) and not torch.equal(shared[k], amax[k])}, key=natural_key)
    if differing:
        log.warning("%d fused linears (w1/w3, wq_a/wkv_a) hold different amax from their partner's (a run made before "
                    "engine constraints were applied in the run): exported with the pair's max, which the run did not "
                    "evaluate; recalibrate to evaluate the exported model (first: %s)", len(differing),
                    ", ".join(differing[:3]))
    return shared


def _refusal(problems: list[tuple[str, str]], why: str = "serving engines would compute NaN with them",
             fix: str = "recalibrate so that every quantized module sees data (more data.num_samples, "
                        "calib=all_experts), or leave these modules unquantized") -> UserError:
    problems = sorted(set(problems), key=lambda p: (natural_key(p[0]), p[1]))
    listing = "; ".join(f"{m} ({why})" for m, why in problems)
    modules = len({m for m, _ in problems})
    return UserError(f"{modules} quantized modules cannot be exported, {why}: {listing}", fix=fix)


# The smallest positive float8_e4m3fn (a subnormal): a largest block scale (NVFP4) or code (FP8) below it is 0.
_E4M3_TINY = 2.0 ** -9


def weight_range_problem(real: torch.Tensor, weight_amax: torch.Tensor) -> str | None:
    """Why the scales from ``weight_amax`` cannot represent ``real``, or None. The largest element maps to
    max|w| x 448 / amax: the NVFP4 block scale of its block (E4M3) or its FP8 code. Above 448 it saturates (the
    weight is clipped: an amax below the weight's own max); below E4M3's smallest value every block is zero."""
    top, amax = float(real.float().abs().max()), float(weight_amax)
    if top > amax:
        return f"weight amax {amax} below the weight's own max {top}: its scales cannot represent it"
    if top * E4M3_MAX / amax < _E4M3_TINY:
        return f"weight amax {amax} over {top}: every scale of the weight underflows to 0"
    return None


class _WeightOutOfRange(Exception):
    """A weight its amax cannot represent (collected over the whole export, then refused at once)."""


def _linear_tensors(module: str, reader: ShardReader, scales: ModuleScales | None, unquantized: str,
                    device: torch.device) -> dict[str, torch.Tensor]:
    weight = reader.get(f"{module}.weight")
    block_scale = reader.get(f"{module}.scale") if f"{module}.scale" in reader else None
    hf = hf_module(module)
    if scales is None:
        if block_scale is not None and unquantized == "bf16":
            return {f"{hf}.weight": dequant(weight.to(device), block_scale.to(device), torch.bfloat16).cpu()}
        out = {f"{hf}.weight": weight}
        if block_scale is not None:
            out[f"{hf}.weight_scale_inv"] = block_scale
        return out
    # The real weight exactly as the calibrated model's quantizer saw it (bf16 compute dtype).
    weight = weight.to(device)
    real = dequant(weight, block_scale.to(device), torch.bfloat16) if block_scale is not None else weight.to(torch.bfloat16)
    # Static block scales clip on purpose (the MSE search picks them): their blocks are written as calibrated.
    if scales.block_amax is None and (problem := weight_range_problem(real, scales.weight_amax)) is not None:
        raise _WeightOutOfRange(problem)
    if scales.block_amax is not None:
        packed, block, scale_2 = pack_nvfp4_static(real, scales.block_amax.to(device), scales.weight_amax.to(device),
                                                   scales.fp8_max)
        tensors = {f"{hf}.weight": packed, f"{hf}.weight_scale": block, f"{hf}.weight_scale_2": scale_2}
    elif scales.fmt == NVFP4:
        packed, block, scale_2 = pack_nvfp4(real, scales.weight_amax.to(device))
        tensors = {f"{hf}.weight": packed, f"{hf}.weight_scale": block, f"{hf}.weight_scale_2": scale_2}
    else:
        codes, weight_scale = quantize_fp8(real, scales.weight_amax.to(device))
        tensors = {f"{hf}.weight": codes, f"{hf}.weight_scale": weight_scale}
    return {**{k: v.cpu() for k, v in tensors.items()}, f"{hf}.input_scale": scales.input_scale}


def hf_quant_config(run: Run, formats: dict[str, str | None], modules: list[str]) -> dict[str, Any]:
    """hf_quant_config.json in Hugging Face names (the form modelopt's own export writes)."""
    import modelopt

    from deepseek_ptq.common import choice

    used = sorted({f for f in formats.values() if f})
    quantization: dict[str, Any] = {}
    if len(used) == 1 and used[0] in CALIBRATED:
        quantization.update(_layer_algo(used[0]))
    else:  # as modelopt's export writes several formats (quant_utils.process_layer_quant_config)
        quantization["quant_algo"] = "MIXED_PRECISION"
        quantization["quantized_layers"] = {hf_module(m): _layer_algo(f)
                                            for m, f in sorted(formats.items(), key=lambda x: natural_key(x[0])) if f}
    kv = choice(run.quant_cfg.get("kv_cache"))
    quantization["kv_cache_quant_algo"] = kv.upper() if kv else None
    # Routers and the V3.2 indexer's weights_proj stay high precision; engines must not build them as quantized layers.
    never = [m for m in modules if m.endswith(".ffn.gate") or m.endswith(".indexer.weights_proj")]
    excluded = [m for m, f in formats.items() if not f] + never
    quantization["exclude_modules"] = sorted((hf_module(m) for m in excluded), key=natural_key)
    return {"producer": {"name": "modelopt", "version": modelopt.__version__, "runner": "deepseek-ptq"},
            "quantization": quantization}


def _layer_algo(fmt: str) -> dict[str, Any]:
    """A quantized layer's entry: NVFP4 with its 16-element groups, FP8 per tensor, or DeepSeek's 128x128 FP8 blocks."""
    return {NVFP4: {"quant_algo": NVFP4, "group_size": 16}, FP8: {"quant_algo": FP8},
            FP8_BLOCK: {"quant_algo": FP8_BLOCK, "group_size": 128}}[fmt]


def _inline_quant_config(quant: dict[str, Any]) -> dict[str, Any]:
    """config.json's ``quantization_config``: modelopt's conversion of hf_quant_config.json. It has no
    compressed-tensors group for FP8 blocks and warns about them: their format is in ``quantized_layers``, the
    entries engines read (README, "Mixed precision")."""
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f"Unsupported quantization algorithm '{FP8_BLOCK}'")
        return convert_hf_quant_config_format(quant)


def export_run(run_dir: Path, out: Path, max_shard_bytes: int = 5 * 2**30, unquantized: str = "bf16",
               device: str = "auto", progress: bool = True) -> Path:
    """Write the Hugging Face checkpoint of ``run_dir`` to ``out``; returns ``out``.

    ``device``: where weights are dequantized and packed (``auto``: CUDA when available). The bytes do not depend
    on it (CUDA and CPU exports of one run compared equal on an H200).
    """
    from deepseek_ptq.quant.recipes import build_quant_config, stored_block_modules

    if unquantized not in ("fp8", "bf16"):
        raise UserError(f"--unquantized {unquantized!r} is not a choice", fix="use fp8 or bf16")
    run_dir, out = Path(run_dir), Path(out)
    check_new_output(out)
    compute = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
    run = read_run(run_dir)
    amax = merge_amax(run_dir, run.world_size)
    world_size = pick_world_size(run.ckpt_dir, run.world_size)
    with ShardReader(run.ckpt_dir, world_size) as reader:
        keys = reader.keys()
        modules = sorted({k.rsplit(".", 1)[0] for k in keys}, key=natural_key)
        linears = [m for m in modules if is_linear(m)]
        mtq_cfg = build_quant_config(run.quant_cfg, on_cpu=False)
        formats = module_formats(mtq_cfg, linears, run.quant_cfg.preset,
                                 frozenset(stored_block_modules(run.quant_cfg, linears)))
        unstored = [m for m, f in formats.items() if f == FP8_BLOCK and f"{m}.scale" not in reader]
        if unstored:
            raise UserError(f"{len(unstored)} linears are to keep their stored FP8 blocks (format: fp8_block), but "
                            f"{run.ckpt_dir} stores them without block scales (first: {', '.join(unstored[:3])})",
                            fix="calibrate with format: none for them, or use an FP8 checkpoint")
        # refuses before anything is written
        plan = plan_scales(formats, amax, static_weight_fp8_max(mtq_cfg, linears))
        kv_scales = kv_cache_scales(run.quant_cfg, amax, run.args.n_layers)
        with atomic_output_dir(out) as tmp:
            writer = ShardedWriter(tmp, max_shard_bytes)
            by_module: dict[str, list[str]] = {}
            for key in keys:
                by_module.setdefault(key.rsplit(".", 1)[0], []).append(key)
            out_of_range: list[tuple[str, str]] = []  # known only once each weight is read
            for module in tqdm(modules, desc="export", unit="module", disable=not progress):
                if module in formats:
                    # An unquantized indexer linear keeps its stored form (FP8 blocks in DeepSeek's release), and
                    # so does every linear the run left in its FP8 blocks on purpose.
                    stored = "fp8" if is_indexer(module) or formats[module] == FP8_BLOCK else unquantized
                    try:
                        tensors = _linear_tensors(module, reader, plan.get(module), stored, compute)
                    except _WeightOutOfRange as err:
                        out_of_range.append((module, str(err)))
                        continue
                else:
                    tensors = {to_hf(k): reader.get(k) for k in by_module[module]}
                for name, tensor in tensors.items():
                    writer.add(name, tensor)
            for name, tensor in kv_scales.items():
                writer.add(name, tensor)
            if out_of_range:  # the temporary folder goes with the error: nothing is left behind
                raise _refusal(out_of_range, why="their calibrated scales cannot represent their weights",
                               fix="export a run calibrated on this checkpoint, with its amax dicts as it wrote them")
            writer.finish()
            quant = hf_quant_config(run, formats, modules)
            write_json(tmp / "hf_quant_config.json", quant)
            write_json(tmp / "config.json", {**hf_config(run.args),
                                                    "quantization_config": _inline_quant_config(quant)})
            for name in TOKENIZER_FILES:
                if (run.ckpt_dir / name).exists():
                    shutil.copyfile(run.ckpt_dir / name, tmp / name)  # the umask's mode, not the source's
                    set_default_mode(tmp / name)
    log.info("exported %s -> %s (%d quantized linears)", run_dir, out, len(plan))
    return out


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise UserError(f"--max-shard-size {text!r} is not a size", fix="write it like 5GB, 500MB or 1000000")
    number, prefix, unit = match.groups()
    base = 1024 if unit.lower().startswith("i") else 1000
    return int(float(number) * base ** " KMGT".index(prefix.upper() or " "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepseek_ptq.hf.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="run directory of a finished calibration run")
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file (default 5GB); one file's tensors are held in memory")
    parser.add_argument("--unquantized", choices=("bf16", "fp8"), default="bf16",
                        help="form of linears left unquantized: bf16 (default, as engines load them) or the released FP8 blocks")
    parser.add_argument("--device", default="auto", help="where to pack weights: auto (CUDA if present), cpu, cuda")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        export_run(opts.run_dir, opts.out, parse_size(opts.max_shard_size), opts.unquantized, opts.device)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"exported {opts.run_dir} -> {opts.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
