"""What one rank's calibration yields, resident (the whole shard at once) or layer-streamed (pipeline/stream.py):
the amax state, the fixup's record for the run directory, the routed token counts and the evaluation scores.
Everything after calibration (the gather, the files, W&B) reads only this, so both ways write the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from modelopt.torch.quantization.nn import TensorQuantizer

from deepseek_ptq.common import choice
from deepseek_ptq.model.load import RandomWeights, build_model
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.observe.evaluate import SequenceScores, score_sequences
from deepseek_ptq.pipeline.data import Batches
from deepseek_ptq.pipeline.rundir import amax_state, quantizer_lines, unquantized_linears
from deepseek_ptq.quant.calibrate import calibrate
from deepseek_ptq.quant.engine_constraints import apply_engine_constraints
from deepseek_ptq.quant.fixup import fixup, has_amax, missing_amax

_SUMMED = ("synced", "filled", "fixup_s", "collectives")
_MERGED = ("summary", "before", "after", "sources")
_LISTED = ("missing", "unquantized", "no_amax_layers")


@dataclass
class Calibrated:
    amax: dict[str, torch.Tensor]  # every quantizer buffer of this rank (rundir.amax_state's keys)
    record: dict[str, Any]  # fixup_record's keys: what this rank contributes to the run directory
    tokens: dict[int, list[int]]  # MoE layer -> tokens routed to each local expert during calibration
    scores: SequenceScores | None
    timings: dict[str, float]  # load, calibrate, eval (seconds)
    layers: list[dict[str, Any]] = field(default_factory=list)  # per-layer timings of a streamed run
    resumed_from: int | None = None  # a streamed run: the first layer this run calibrated


def _amax_table(model: torch.nn.Module) -> dict[str, float]:
    """Max of each quantizer's amax (scalar for per-tensor formats; static block scales: their global amax, the
    per-tensor scale engines read), read back in one transfer."""
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and has_amax(m)]
    if not named:
        return {}
    per_tensor = [getattr(m, "global_amax", None) for _, m in named]
    values = torch.stack([(m.amax if g is None else g).float().max() for (_, m), g in zip(named, per_tensor)]).tolist()
    return {n: v for (n, _), v in zip(named, values)}


def fixup_record(model: torch.nn.Module, par: Parallel, sync: bool, device: torch.device) -> dict[str, Any]:
    """The fixup on ``model`` (the whole shard, or one piece of it: every rank must call it on the same piece),
    then the engines' shared scales (local to each layer), and what they leave for the run directory."""
    before = _amax_table(model)
    report = fixup(model, par, sync_experts=sync, device=device)
    fused = apply_engine_constraints(model)
    return {"summary": quantizer_lines(model), "before": before, "after": _amax_table(model),
            "sources": report.sources | fused, "missing": missing_amax(model), "unquantized": unquantized_linears(model),
            "synced": report.synced_input_amax, "filled": report.filled_weight_amax, "fixup_s": report.seconds,
            "collectives": report.collectives, "no_amax_layers": report.layers_without_expert_input_amax}


def merge_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The record of the pieces in model order, as if the fixup had run once over the whole shard."""
    merged: dict[str, Any] = {k: 0 for k in _SUMMED} | {k: {} for k in _MERGED} | {k: [] for k in _LISTED}
    for record in records:
        for key in _SUMMED:
            merged[key] += record[key]
        for key in _MERGED:
            merged[key].update(record[key])
        for key in _LISTED:
            merged[key] += record[key]
    return merged


def calibrate_resident(cfg: Any, args: Any, ckpt: Path | RandomWeights, par: Parallel, device: torch.device,
                       batches: Batches, mtq_cfg: dict[str, Any], evaluate: bool) -> Calibrated:
    """The whole shard on the device: load, calibrate, fix up, evaluate."""
    rank0 = par.rank == 0
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model = build_model(args, ckpt, par, device, progress=rank0)
    timings["load"] = time.perf_counter() - start
    timings["calibrate"] = calibrate(model, mtq_cfg, batches.calib, choice(cfg.calib.name) == "all_experts", device,
                                     progress=rank0, fast=cfg.calib.fast, experts_ratio=cfg.calib.experts_ratio)
    tokens = {i: moe.token_counts.tolist() for i, moe in model.moe_layers()}  # before evaluation adds its own
    record = fixup_record(model, par, cfg.calib.sync, device)
    amax = amax_state(model)
    start = time.perf_counter()
    scores = score_sequences(model, batches.heldout, device, progress=rank0) if evaluate else None
    timings["eval"] = time.perf_counter() - start
    return Calibrated(amax, record, tokens, scores, timings)
