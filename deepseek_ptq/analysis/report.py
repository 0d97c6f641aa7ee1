"""One table for a Hydra multirun: each job's overrides, status, speed, counts and evaluation.

    python -m deepseek_ptq.analysis.report outputs/multirun/<date>/<time> [--out DIR]

Writes report.md, report.csv and report.png into the sweep folder (or --out). Failed or unfinished jobs are
rows that say so; they never stop the report.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from deepseek_ptq.common import natural_key
from deepseek_ptq.observe.eval_units import UNIT_LABELS
from deepseek_ptq.pipeline.metrics import RunMetrics

COLUMNS = ["job", "overrides", "status", "calib_s", "tokens_per_s", "quantizers", "synced_inputs",
           "experts_without_tokens", "missing_amax", "w2_sync_median", "kl", "kl_se", "top1_agreement",
           "quality_ref", "quality_quant", "quality_delta", "quality_delta_se", "quality_unit", "error"]


def job_dirs(sweep: Path) -> list[Path]:
    """The sweep's job folders: those Hydra configured (.hydra) or a run wrote (metrics.json)."""
    return sorted((p for p in sweep.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / "metrics.json").exists())),
                  key=lambda p: natural_key(p.name))


def _overrides(job: Path) -> str:
    path = job / ".hydra" / "overrides.yaml"
    return ",".join(map(str, OmegaConf.load(path))) if path.exists() else ""


def job_row(job: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"job": job.name, "overrides": _overrides(job)}
    m = RunMetrics.read(job)
    if m is None:
        return row | {"status": "failed", "error": "no readable metrics.json"}
    row["status"] = m.status
    if m.status != "ok":
        return row | {"error": str(m.error or "did not finish").splitlines()[0][:200]}
    counts, ev = m.counts, m.eval or {}
    w2 = m.stats.get("expert_input_sync_ratio", {}).get("w2", {})
    row |= {"calib_s": m.timings_s["calibrate"], "tokens_per_s": m.calib_tokens_per_s,
            "quantizers": counts.get("quantizers"), "synced_inputs": counts.get("synced_input_amax"),
            "experts_without_tokens": counts.get("uncalibrated_experts"), "missing_amax": counts.get("missing_amax"),
            "w2_sync_median": w2.get("median"), "kl": ev.get("kl"), "kl_se": ev.get("kl_se"),
            "top1_agreement": ev.get("top1_agreement")}
    for unit, label in UNIT_LABELS.items():
        if f"{unit}_ref" in ev:
            row |= {"quality_ref": ev[f"{unit}_ref"], "quality_quant": ev[f"{unit}_quant"],
                    "quality_delta": ev.get(f"{unit}_delta"), "quality_delta_se": ev.get(f"{unit}_delta_se"),
                    "quality_unit": label}
    return row


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):  # (value, standard error)
        mean, se = value
        if mean is None:
            return "-"
        return _fmt(mean) if se is None else f"{mean:.4g} ± {se:.2g}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


MARKDOWN_COLUMNS = [("overrides", "overrides"), ("status", "status"), ("calib_s", "calib s"),
                    ("tokens_per_s", "tokens/s"), ("synced_inputs", "synced inputs"),
                    ("experts_without_tokens", "experts w/o tokens"), ("w2_sync_median", "w2 sync median"),
                    ("kl", "KL ± se"), ("top1_agreement", "top-1 agree"), ("quality_ref", "ref"),
                    ("quality_quant", "quantized"), ("quality_delta", "quantized - ref ± se"), ("quality_unit", "unit")]
# Markdown cells that show a value with its standard error
WITH_SE = {"kl": "kl_se", "quality_delta": "quality_delta_se"}


def _split_overrides(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Overrides every job shares (said once) and, per job, the ones that tell it apart."""
    sets = [row["overrides"].split(",") if row["overrides"] else [] for row in rows]
    common = [o for o in sets[0] if all(o in s for s in sets)] if sets else []
    return common, [",".join(o for o in s if o not in common) or "(defaults)" for s in sets]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    common, distinct = _split_overrides(rows)
    lines = [f"All jobs: {', '.join(common)}", ""] if common else []
    lines += ["| " + " | ".join(h for _, h in MARKDOWN_COLUMNS) + " |", "|" + "---|" * len(MARKDOWN_COLUMNS)]
    for row, label in zip(rows, distinct):
        cells = [_fmt((row.get(k), row.get(WITH_SE[k])) if k in WITH_SE else row.get(k)) for k, _ in MARKDOWN_COLUMNS]
        cells[0] = _fmt(label)
        if row["status"] != "ok":
            cells[2] = _fmt(row.get("error"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    ok = [r for r in rows if r["status"] == "ok" and r.get("kl") is not None]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for r, label in zip(rows, _split_overrides(rows)[1]) if r in ok]
    fig, (ax_kl, ax_q) = plt.subplots(1, 2, figsize=(12, 1.6 + 0.45 * len(ok)), sharey=True)
    ax_kl.barh(labels, [r["kl"] for r in ok], color="tab:red")
    ax_kl.set_xscale("log")
    ax_kl.set_xlabel("KL(reference || quantized), nats/token (log)")
    ax_kl.invert_yaxis()
    unit = ok[0].get("quality_unit") or ""
    ax_q.barh(labels, [r["quality_quant"] - r["quality_ref"] for r in ok], color="tab:blue")
    ax_q.set_xlabel(f"quantized - reference ({unit})")
    fig.suptitle("Sweep: what quantization did to the output (held-out data)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepseek_ptq.analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="a Hydra multirun folder (holds multirun.yaml and job folders)")
    parser.add_argument("--out", type=Path, help="where to write report.{md,csv,png} (default: the sweep folder)")
    opts = parser.parse_args(argv)
    if not opts.sweep.is_dir():
        print(f"error: {opts.sweep} is not a folder. Fix: pass a multirun folder, e.g. outputs/multirun/<date>/<time>",
              file=sys.stderr)
        return 2
    jobs = job_dirs(opts.sweep)
    if not jobs:
        print(f"error: {opts.sweep} holds no job folders. Fix: pass the folder that holds multirun.yaml", file=sys.stderr)
        return 2
    rows = [job_row(j) for j in jobs]
    out = opts.out or opts.sweep
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows)
    (out / "report.md").write_text(markdown)
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_plot(rows, out / "report.png")
    print(markdown)
    failed = sum(r["status"] != "ok" for r in rows)
    print(f"{len(rows)} jobs ({failed} not ok); written to {out}/report.{{md,csv,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
