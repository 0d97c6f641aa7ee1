"""One rank's run: calibration (resident or layer-streamed) -> outputs (rank 0 writes what is shared)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from deepseek_ptq.common import choice, natural_key
from deepseek_ptq.errors import UserError
from deepseek_ptq.files import write_json
from deepseek_ptq.model.load import checkpoint_dir, checkpoint_id, resolve_args
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.observe import memory, wandb_log
from deepseek_ptq.observe.eval_units import SEQUENCES_CSV
from deepseek_ptq.observe.evaluate import summarize, write_sequences
from deepseek_ptq.observe.layer_timings import layer_summary
from deepseek_ptq.observe.plots import write_plots
from deepseek_ptq.observe.stats import collect, write_csv
from deepseek_ptq.observe.summary import write_summary
from deepseek_ptq.pipeline import resume, rundir
from deepseek_ptq.pipeline.calibrated import calibrate_resident
from deepseek_ptq.pipeline.config import eval_enabled
from deepseek_ptq.pipeline.data import make_batches
from deepseek_ptq.pipeline.launch import leave_team
from deepseek_ptq.pipeline.rundir import gather_to_all, save_amax, write_quant_summary
from deepseek_ptq.pipeline.stream import calibrate_streamed
from deepseek_ptq.quant.forced_routing import statistics_experts
from deepseek_ptq.quant.recipes import build_quant_config, hf_algo_name

log = logging.getLogger(__name__)


def run_rank(cfg: Any, run_dir: Path, par: Parallel, device: torch.device) -> None:
    """Calibrate this rank's shard; rank 0 then writes the run directory and the W&B run."""
    with wandb_log.tracking(cfg, run_dir, rank0=par.rank == 0) as tracker:
        _run(cfg, run_dir, par, device, tracker)


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - start


def _run(cfg: Any, run_dir: Path, par: Parallel, device: torch.device, tracker: wandb_log.Tracker) -> None:
    """The steps of one rank, in order; every rank enters every collective (the gather) before rank 0 writes."""
    t_start = time.perf_counter()
    rank0 = par.rank == 0
    memory.reset_peaks(device)
    args = resolve_args(cfg.model)
    args.check_world_size(par.world_size)
    evaluate = eval_enabled(cfg)
    # The data first: text too short for data.seq_len fails before any weight is read.
    batches = make_batches(cfg.data, args.vocab_size, cfg.model.ckpt_dir, cfg.eval.num_samples if evaluate else 0)
    ckpt = checkpoint_dir(cfg.model, args, par.world_size)
    mtq_cfg = build_quant_config(cfg.quant, on_cpu=device.type == "cpu")
    if cfg.calib.layerwise:
        result = calibrate_streamed(cfg, args, ckpt, par, device, batches, mtq_cfg, evaluate, run_dir)
    else:
        result = calibrate_resident(cfg, args, ckpt, par, device, batches, mtq_cfg, evaluate)
    save_amax(result.amax, run_dir, par.rank, par.world_size)
    gathered = gather_to_all({**result.record, "memory": memory.peaks(device), "layers": result.layers},
                             par.world_size)
    leave_team()  # (the last collective: the other ranks finish now, while rank 0 writes the results)
    if not rank0:
        return
    timings = dict(result.timings)
    counts = _write_model_files(cfg, args, run_dir, gathered)
    with _timed(timings, "stats"):
        stats = collect(gathered, result.tokens, batches.calib_tokens * _statistics_experts(cfg, args))
        write_csv(stats, run_dir / "stats")
        if result.scores is not None:
            write_sequences(result.scores, batches.byte_level, run_dir / "stats" / SEQUENCES_CSV)
        streamed = layer_summary(gathered, run_dir / "stats") if cfg.calib.layerwise else None
    with _timed(timings, "plots"):
        plots = write_plots(stats, run_dir / "plots", title=f"{cfg.model.name}, {cfg.quant.name}, "
                            f"{_calib_label(cfg)}{'+sync' if cfg.calib.sync else ''}, W={par.world_size}")
    timings["fixup"] = max(g["fixup_s"] for g in gathered)
    metrics = _ok_metrics(cfg, run_dir, par, device, ckpt, timings, batches.calib_tokens, counts, stats,
                          summarize(result.scores, batches.byte_level) if result.scores is not None else None)
    metrics["memory"] = memory.per_rank(g["memory"] for g in gathered)
    if streamed is not None:
        metrics["layerwise"] = {**streamed, "resumed_from_layer": result.resumed_from or None}
    _finish(tracker, metrics, stats, plots, run_dir, t_start)
    if cfg.calib.layerwise:
        resume.remove(run_dir)


def _statistics_experts(cfg: Any, args: Any) -> int:
    """Experts per token whose quantizers saw it: what each MoE layer's token counts sum to, per token (top-k
    routed counts, or with calib.experts_ratio the statistics tokens too; all_experts counts its routed ones)."""
    if cfg.calib.experts_ratio is None:
        return args.n_activated_experts
    return statistics_experts(cfg.calib.experts_ratio, args.n_routed_experts, args.n_activated_experts)


def _calib_label(cfg: Any) -> str:
    ratio = cfg.calib.experts_ratio
    return choice(cfg.calib.name) + (f" experts_ratio={ratio:g}" if ratio is not None else "")


def _write_model_files(cfg: Any, args: Any, run_dir: Path, gathered: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0: the quant summary and hf_quant_config.json of the whole model; warnings (or, strict, the error)
    for quantizers left without amax."""
    n_quantizers = write_quant_summary([g["summary"] for g in gathered], run_dir)
    missing = sorted({m for g in gathered for m in g["missing"]}, key=natural_key)
    _write_hf_quant_config(run_dir, cfg, args, sorted({u for g in gathered for u in g["unquantized"]}, key=natural_key))
    if missing:
        log.warning("%d enabled quantizers have no amax after the fixup: %s", len(missing), ", ".join(missing[:10]))
    no_amax_layers = sorted({x for g in gathered for x in g["no_amax_layers"]}, key=natural_key)
    for layer in no_amax_layers:
        log.warning("no rank calibrated any expert input of %s: left without amax", layer)
    if cfg.calib.strict and (missing or no_amax_layers):
        raise UserError(f"{len(missing)} enabled quantizers have no amax after calibration "
                        f"(first: {', '.join(missing[:5])})",
                        fix="calibrate on more data (data.num_samples, data.seq_len) or set calib.strict=false")
    return {"quantizers": n_quantizers, "missing": missing, "no_amax_layers": no_amax_layers,
            "synced": sum(g["synced"] for g in gathered), "filled": sum(g["filled"] for g in gathered),
            "collectives": max(g["collectives"] for g in gathered)}


def _ok_metrics(cfg: Any, run_dir: Path, par: Parallel, device: torch.device, ckpt: Path, timings: dict[str, float],
                n_calib: int, counts: dict[str, Any], stats: Any, eval_metrics: dict[str, Any] | None) -> dict[str, Any]:
    """metrics.json of the finished run (the keys README lists; pipeline/metrics.py reads them)."""
    metrics = rundir.read_metrics(run_dir)
    metrics.update({
        "status": "ok",
        "world_size": par.world_size,
        "calib": choice(cfg.calib.name),
        "calib_sync": cfg.calib.sync,
        "calib_experts_ratio": cfg.calib.experts_ratio,
        "quant": cfg.quant.name,
        "quant_preset": cfg.quant.preset,
        "model": cfg.model.name,
        "ckpt_dir": str(ckpt),
        "checkpoint": checkpoint_id(cfg.model, ckpt, par.world_size),  # what compare matches across world sizes
        "device": str(device),
        "timings_s": {k: timings[k] for k in ("load", "calibrate", "fixup", "eval", "stats", "plots")},
        "tokens_calibrated": n_calib,
        "calib_tokens_per_s": n_calib / timings["calibrate"] if timings["calibrate"] > 0 else None,
        "counts": {"quantizers": counts["quantizers"],
                   "synced_input_amax": counts["synced"],
                   "filled_weight_amax": counts["filled"],
                   "uncalibrated_experts": len(stats.summary["experts_without_tokens"]),
                   "missing_amax": len(counts["missing"]),
                   "fixup_collectives": counts["collectives"]},
        "stats": stats.summary,
        "eval": eval_metrics,
        "missing_amax": counts["missing"],
        "layers_without_expert_input_amax": counts["no_amax_layers"],
    })
    return metrics


def _finish(tracker: wandb_log.Tracker, metrics: dict[str, Any], stats: Any, plots: Any, run_dir: Path,
            t_start: float) -> None:
    """W&B, the end-of-run summary, then status "ok" last: everything else is on disk by then."""
    t0 = time.perf_counter()
    tracker.log_results(metrics, stats, plots, run_dir)
    metrics["timings_s"]["wandb"] = tracker.init_s + time.perf_counter() - t0
    metrics["timings_s"]["total"] = tracker.init_s + time.perf_counter() - t_start  # W&B started before t_start
    metrics["wandb"] = tracker.info
    tracker.update_summary({"timings_s": metrics["timings_s"]})
    print(write_summary(metrics, run_dir), file=sys.stderr)
    rundir.write_metrics(run_dir, metrics)


def _write_hf_quant_config(run_dir: Path, cfg: Any, args: Any, excluded: list[str]) -> None:
    import modelopt

    kv = choice(cfg.quant.kv_cache)
    preset = cfg.quant.preset
    quantization: dict[str, Any] = {"quant_algo": hf_algo_name(preset),
                                    "kv_cache_quant_algo": kv.upper() if kv else None,
                                    # the multi-token-prediction layer is not part of the calibrated model
                                    "exclude_modules": excluded + [f"layers.{args.n_layers}*"]
                                    # the V3.2 indexer's weights_proj is no Linear: never quantized
                                    + (["layers.*.attn.indexer.weights_proj"] if args.has_indexer else [])}
    entries = cfg.quant.get("overrides")
    overrides = OmegaConf.to_container(entries, resolve=True, enum_to_str=True) if entries else []
    if overrides:  # the preset's format is not every quantized linear's: the export names each layer's
        quantization["quant_algo"] = "MIXED_PRECISION"
        quantization["base_quant_algo"] = hf_algo_name(preset)
        quantization["overrides"] = overrides
    if "FP4" in preset.upper():
        quantization["group_size"] = 16
    elif "AWQ" in preset.upper() or "INT4" in preset.upper():
        quantization["group_size"] = 128
    write_json(run_dir / "hf_quant_config.json", {
        "producer": {"name": "modelopt", "version": modelopt.__version__, "runner": "deepseek-ptq"},
        "quantization": quantization,
        "config": OmegaConf.to_container(cfg.quant, resolve=True, enum_to_str=True),
    })
