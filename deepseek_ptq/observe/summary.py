"""The one-screen end-of-run summary, printed on rank 0 and kept as summary.md in the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_summary(metrics: dict[str, Any], run_dir: Path) -> str:
    counts, t = metrics["counts"], metrics["timings_s"]
    sync = "+sync" if metrics.get("calib_sync") else ""
    if metrics.get("calib_experts_ratio") is not None:
        sync = f" experts_ratio={metrics['calib_experts_ratio']:g}{sync}"
    lines = [
        f"deepseek-ptq run {metrics['status']}: {run_dir}",
        f"  model      {metrics['model']}  W={metrics['world_size']}  on {metrics.get('device')}",
        f"  quant      {metrics['quant']} ({metrics.get('quant_preset')})   calib {metrics['calib']}{sync}",
        f"  tokens     {metrics['tokens_calibrated']} calibrated, {metrics.get('calib_tokens_per_s') or 0:.0f} tokens/s",
        f"  quantizers {counts['quantizers']}: {counts['synced_input_amax']} expert inputs synced, "
        f"{counts['filled_weight_amax']} weight amax filled, {counts['missing_amax']} missing",
        f"  experts    {counts['uncalibrated_experts']} received no tokens",
    ]
    w2 = metrics.get("stats", {}).get("expert_input_sync_ratio", {}).get("w2", {})
    if w2.get("n"):
        lines.append(f"  w2 inputs  synced/own: {_pct(w2['larger'])} larger, {_pct(w2['equal'])} equal, "
                     f"{_pct(w2['smaller'])} smaller; median x{w2['median']:.3g}, p90 x{w2['p90']:.3g}, max x{w2['max']:.3g}")
    ev = metrics.get("eval") or {}
    if ev:
        ce = (f"bits/byte {ev['bpb_ref']:.4f} -> {ev['bpb_quant']:.4f}" if "bpb_ref" in ev
              else f"CE {ev['ce_ref']:.4f} -> {ev['ce_quant']:.4f} nats/token")
        lines.append(f"  eval       KL {ev['kl']:.3g}, top-1 agreement {_pct(ev['top1_agreement'])}, {ce} "
                     f"({ev['tokens']} held-out tokens)")
    lines.append("  time       " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()))
    streamed = metrics.get("layerwise")
    if streamed and streamed.get("layers"):
        resumed = streamed.get("resumed_from_layer")
        converted = streamed.get("converted_layers", streamed["layers"])
        lines.append(f"  layers     {streamed['layers']} streamed{f' (resumed at layer {resumed})' if resumed else ''}, "
                     f"{converted} of them converted by modelopt (the others reused a block); "
                     f"slowest layer {streamed['slowest_layer']} ({streamed['slowest_layer_s']:.2f} s); reading weights "
                     f"{streamed['read_s']:.2f} s, of which {_pct(streamed['read_wait_share'])} of the layer time "
                     "held the stream up")
    mem = metrics.get("memory") or {}
    if mem:
        gpu = mem.get("max_peak_gpu_gb")
        lines.append(f"  memory     peak host RSS {mem['max_peak_rss_gb']:.2f} GB"
                     + (f", peak GPU {gpu:.2f} GB" if gpu is not None else "") + " (the largest rank's)")
    wb = metrics.get("wandb")
    if wb:
        lines.append(f"  W&B        {wb['sync_command']}" if wb.get("sync_command") else f"  W&B        {wb.get('url')}")
    return "\n".join(lines)


def write_summary(metrics: dict[str, Any], run_dir: Path) -> str:
    text = format_summary(metrics, run_dir)
    (run_dir / "summary.md").write_text("```\n" + text + "\n```\n")
    return text
