"""One rank's run: model shard -> calibration -> fixup -> outputs (rank 0 writes what is shared)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from modelopt.torch.quantization.nn import TensorQuantizer
from omegaconf import OmegaConf

from deepseek_ptq.common import choice, natural_key
from deepseek_ptq.errors import UserError
from deepseek_ptq.files import write_json
from deepseek_ptq.model.load import build_model, checkpoint_dir, resolve_args
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.observe import wandb_log
from deepseek_ptq.observe.evaluate import SEQUENCES_CSV, score_sequences, summarize, write_sequences
from deepseek_ptq.observe.plots import write_plots
from deepseek_ptq.observe.stats import collect, write_csv
from deepseek_ptq.observe.summary import write_summary
from deepseek_ptq.pipeline import rundir
from deepseek_ptq.pipeline.config import eval_enabled
from deepseek_ptq.pipeline.data import make_batches
from deepseek_ptq.pipeline.rundir import (
    gather_to_all,
    quantizer_lines,
    save_amax,
    unquantized_linears,
    write_quant_summary,
)
from deepseek_ptq.quant.calibrate import calibrate
from deepseek_ptq.quant.fixup import fixup, has_amax, missing_amax
from deepseek_ptq.quant.recipes import build_quant_config, hf_algo_name

log = logging.getLogger(__name__)


def _amax_table(model: torch.nn.Module) -> dict[str, float]:
    """Max of each quantizer's amax (scalar for per-tensor formats)."""
    return {n: float(m.amax.float().max()) for n, m in model.named_modules()
            if isinstance(m, TensorQuantizer) and has_amax(m)}


def run_rank(cfg: Any, run_dir: Path, par: Parallel, device: torch.device) -> None:
    """Calibrate this rank's shard; rank 0 then writes the run directory and the W&B run."""
    with wandb_log.tracking(cfg, run_dir, rank0=par.rank == 0) as tracker:
        _run(cfg, run_dir, par, device, tracker)


def _run(cfg: Any, run_dir: Path, par: Parallel, device: torch.device, tracker: wandb_log.Tracker) -> None:
    t_start = time.perf_counter()
    rank0 = par.rank == 0
    args = resolve_args(cfg.model)
    args.check_world_size(par.world_size)
    t0 = time.perf_counter()
    ckpt = checkpoint_dir(cfg.model, args, par.world_size)
    model = build_model(args, ckpt, par, device, progress=rank0)
    t_load = time.perf_counter() - t0
    run_eval = eval_enabled(cfg)
    batches = make_batches(cfg.data, args.vocab_size, str(ckpt), cfg.eval.num_samples if run_eval else 0)
    mtq_cfg = build_quant_config(cfg.quant, on_cpu=device.type == "cpu")
    all_experts = choice(cfg.calib.name) == "all_experts"
    t_calib = calibrate(model, mtq_cfg, batches.calib, all_experts, device, progress=rank0, fast=cfg.calib.fast)
    tokens = {i: moe.token_counts.tolist() for i, moe in model.moe_layers()}  # before evaluation adds its own
    before = _amax_table(model)
    report = fixup(model, par, sync_experts=cfg.calib.sync, device=device)
    after = _amax_table(model)
    missing = missing_amax(model)
    save_amax(model, run_dir, par.rank, par.world_size)
    t0 = time.perf_counter()
    scores = score_sequences(model, batches.heldout, device, progress=rank0) if run_eval else None
    eval_metrics = summarize(scores, batches.byte_level) if scores is not None else None
    t_eval = time.perf_counter() - t0

    local = {"summary": quantizer_lines(model), "before": before, "after": after, "sources": report.sources,
             "missing": missing, "unquantized": unquantized_linears(model), "synced": report.synced_input_amax,
             "filled": report.filled_weight_amax, "fixup_s": report.seconds, "collectives": report.collectives,
             "no_amax_layers": report.layers_without_expert_input_amax}
    gathered = gather_to_all(local, par.world_size)
    if not rank0:
        return
    n_quantizers = write_quant_summary([g["summary"] for g in gathered], run_dir)
    missing_all = sorted({m for g in gathered for m in g["missing"]}, key=natural_key)
    _write_hf_quant_config(run_dir, cfg, args, sorted({u for g in gathered for u in g["unquantized"]}, key=natural_key))
    if missing_all:
        log.warning("%d enabled quantizers have no amax after the fixup: %s", len(missing_all), ", ".join(missing_all[:10]))
    no_amax_layers = sorted({x for g in gathered for x in g["no_amax_layers"]}, key=natural_key)
    for layer in no_amax_layers:
        log.warning("no rank calibrated any expert input of %s: left without amax", layer)
    if cfg.calib.strict and (missing_all or no_amax_layers):
        raise UserError(f"{len(missing_all)} enabled quantizers have no amax after calibration "
                        f"(first: {', '.join(missing_all[:5])})",
                        fix="calibrate on more data (data.num_samples, data.seq_len) or set calib.strict=false")

    t0 = time.perf_counter()
    stats = collect(gathered, tokens, batches.calib_tokens * args.n_activated_experts)
    write_csv(stats, run_dir / "stats")
    if scores is not None:
        write_sequences(scores, batches.byte_level, run_dir / "stats" / SEQUENCES_CSV)
    t_stats = time.perf_counter() - t0
    t0 = time.perf_counter()
    plots = write_plots(stats, run_dir / "plots", title=f"{cfg.model.name}, {cfg.quant.name}, {choice(cfg.calib.name)}"
                        f"{'+sync' if cfg.calib.sync else ''}, W={par.world_size}")
    t_plots = time.perf_counter() - t0
    n_calib = batches.calib_tokens
    metrics = rundir.read_metrics(run_dir)
    metrics.update({
        "status": "ok",
        "world_size": par.world_size,
        "calib": choice(cfg.calib.name),
        "calib_sync": cfg.calib.sync,
        "quant": cfg.quant.name,
        "quant_preset": cfg.quant.preset,
        "model": cfg.model.name,
        "ckpt_dir": str(ckpt),
        "device": str(device),
        "timings_s": {"load": t_load, "calibrate": t_calib, "fixup": max(g["fixup_s"] for g in gathered),
                      "eval": t_eval, "stats": t_stats, "plots": t_plots},
        "tokens_calibrated": n_calib,
        "calib_tokens_per_s": n_calib / t_calib if t_calib > 0 else None,
        "counts": {"quantizers": n_quantizers,
                   "synced_input_amax": sum(g["synced"] for g in gathered),
                   "filled_weight_amax": sum(g["filled"] for g in gathered),
                   "uncalibrated_experts": len(stats.summary["experts_without_tokens"]),
                   "missing_amax": len(missing_all),
                   "fixup_collectives": max(g["collectives"] for g in gathered)},
        "stats": stats.summary,
        "eval": eval_metrics,
        "missing_amax": missing_all,
        "layers_without_expert_input_amax": no_amax_layers,
    })
    t0 = time.perf_counter()
    tracker.log_results(metrics, stats, plots, run_dir)
    metrics["timings_s"]["wandb"] = tracker.init_s + time.perf_counter() - t0
    metrics["timings_s"]["total"] = tracker.init_s + time.perf_counter() - t_start  # W&B started before t_start
    metrics["wandb"] = tracker.info
    tracker.update_summary({"timings_s": metrics["timings_s"]})
    print(write_summary(metrics, run_dir), file=sys.stderr)
    rundir.write_metrics(run_dir, metrics)  # status "ok" goes last: everything else is on disk


def _write_hf_quant_config(run_dir: Path, cfg: Any, args: Any, excluded: list[str]) -> None:
    import modelopt

    kv = choice(cfg.quant.kv_cache)
    preset = cfg.quant.preset
    quantization: dict[str, Any] = {"quant_algo": hf_algo_name(preset),
                                    "kv_cache_quant_algo": kv.upper() if kv else None,
                                    # the multi-token-prediction layer is not part of the calibrated model
                                    "exclude_modules": excluded + [f"layers.{args.n_layers}*"]}
    if "FP4" in preset.upper():
        quantization["group_size"] = 16
    elif "AWQ" in preset.upper() or "INT4" in preset.upper():
        quantization["group_size"] = 128
    write_json(run_dir / "hf_quant_config.json", {
        "producer": {"name": "modelopt", "version": modelopt.__version__, "runner": "deepseek-ptq"},
        "quantization": quantization,
        "config": OmegaConf.to_container(cfg.quant, resolve=True, enum_to_str=True),
    })
