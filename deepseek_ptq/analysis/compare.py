"""Compare the amax of two runs of one model: the validation table of a calibration-mode study.

    python -m deepseek_ptq.analysis.compare RUN_A RUN_B [--out PREFIX]

Works across world sizes (each run's per-rank amax dicts are merged first). Prints markdown and writes
PREFIX.md and PREFIX.json (default: RUN_B/analysis/compare-<A>). Ratios are B / A.
When both runs evaluated the same held-out sequences, their evaluation is compared sequence by sequence
(paired differences B - A with standard errors: far smaller than either run's own error bar).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepseek_ptq.common import natural_key
from deepseek_ptq.errors import UserError
from deepseek_ptq.files import write_json
from deepseek_ptq.observe.eval_units import SEQUENCES_CSV, UNIT_LABELS
from deepseek_ptq.observe.evaluate import read_sequences, standard_error
from deepseek_ptq.observe.stats import QuantizerPath, ratio_summary
from deepseek_ptq.pipeline.metrics import RunMetrics
from deepseek_ptq.pipeline.rundir import read_amax, read_finished

AMAX_SUFFIX = "._amax"
ANALYSIS = "analysis"  # the default output folder, inside the second run's folder


@dataclass(frozen=True)
class Run:
    path: Path
    metrics: RunMetrics
    amax: dict[str, torch.Tensor]  # quantizer path -> amax, merged over ranks

    @property
    def label(self) -> str:
        return f"{self.path.name} ({self.metrics.mode_label})"


def load_run(path: Path) -> Run:
    metrics = read_finished(path)
    merged: dict[str, torch.Tensor] = {}
    for key, value in read_amax(path, int(metrics.world_size)).items():
        if key.endswith(AMAX_SUFFIX):
            merged[key.removesuffix(AMAX_SUFFIX)] = value.float()
    return Run(path, metrics, merged)


def _weights(m: RunMetrics) -> str | None:
    """The checkpoint a run calibrated, named the same at every world size (runs before that key: its folder)."""
    return m.checkpoint or m.ckpt_dir


def _same_model(a: Run, b: Run) -> None:
    ma, mb = a.metrics, b.metrics
    if (ma.model, _weights(ma)) != (mb.model, _weights(mb)):
        raise UserError(f"the runs calibrated different models: {ma.model} ({_weights(ma)}) vs {mb.model} ({_weights(mb)})",
                        fix="compare two runs of the same model and checkpoint")


def _group(path: QuantizerPath) -> str:
    if path.expert is not None:
        return f"expert {path.kind.removeprefix('expert.')} {path.role}" if path.role == "input" else "expert weight"
    return {"attn": "attention", "shared": "shared experts", "dense": "dense MLP"}.get(path.kind.split(".")[0], "other")


GROUP_ORDER = ["expert weight", "attention", "shared experts", "dense MLP", "other",
               "expert w1 input", "expert w3 input", "expert w2 input"]


def compare(a: Run, b: Run, top: int = 10) -> dict[str, Any]:
    _same_model(a, b)
    common = sorted(set(a.amax) & set(b.amax), key=natural_key)
    groups: dict[str, dict[str, Any]] = {}
    diffs = []
    for name in common:
        group = groups.setdefault(_group(QuantizerPath.parse(name)), {"compared": 0, "identical": 0, "ratios": []})
        va, vb = a.amax[name], b.amax[name]
        group["compared"] += 1
        if va.shape == vb.shape and torch.equal(va, vb):
            group["identical"] += 1
        ra, rb = float(va.max()), float(vb.max())
        if ra > 0:
            group["ratios"].append(rb / ra)
            if rb != ra:
                diffs.append((name, ra, rb))
    table = {}
    for name in sorted(groups, key=lambda g: GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER)):
        g = groups[name]
        table[name] = {"compared": g["compared"], "identical": g["identical"], "ratio_b_over_a": ratio_summary(g["ratios"])}
    diffs.sort(key=lambda d: abs(math.log(d[2] / d[1])) if d[1] > 0 and d[2] > 0 else math.inf, reverse=True)
    return {
        "a": {"path": str(a.path), "label": a.label}, "b": {"path": str(b.path), "label": b.label},
        "groups": table,
        "only_in_a": sorted(set(a.amax) - set(b.amax), key=natural_key),
        "only_in_b": sorted(set(b.amax) - set(a.amax), key=natural_key),
        "largest_differences": [{"quantizer": n, "a": x, "b": y, "ratio": y / x if x else None} for n, x, y in diffs[:top]],
        "eval": paired_eval(a, b),
    }


def paired_eval(a: Run, b: Run) -> dict[str, Any]:
    """B - A per held-out sequence, for KL and the quantized model's cross-entropy; or why they cannot be paired."""
    sa, sb = (read_sequences(run.path / "stats" / SEQUENCES_CSV) for run in (a, b))
    if sa is None or sb is None:
        return {"paired": False, "reason": f"no stats/{SEQUENCES_CSV} in {'A' if sa is None else 'B'} (run with eval.enabled=true)"}
    if sa.keys() != sb.keys() or len(sa["kl"]) != len(sb["kl"]):
        return {"paired": False, "reason": f"different held-out sets ({len(sa['kl'])} vs {len(sb['kl'])} sequences)"}
    ref = next(k for k in sa if k.endswith("_ref"))
    if not torch.allclose(sa[ref], sb[ref], rtol=1e-3, atol=0):  # the unquantized model scored the same data
        return {"paired": False, "reason": "the reference cross-entropies differ: not the same held-out sequences"}
    out: dict[str, Any] = {"paired": True, "sequences": len(sa["kl"]), "unit": ref.removesuffix("_ref")}
    for key in ("kl", ref.replace("_ref", "_quant")):
        diff = sb[key] - sa[key]
        se = standard_error(diff)
        out[key] = {"a": float(sa[key].mean()), "b": float(sb[key].mean()), "b_minus_a": float(diff.mean()),
                    "se": se, "z": float(diff.mean()) / se if se else None,
                    "b_lower_share": float((diff < 0).double().mean())}
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def to_markdown(result: dict[str, Any]) -> str:
    lines = [f"A: {result['a']['label']}  ", f"B: {result['b']['label']}", "",
             "| quantizers | compared | bit-identical | B/A larger / equal / smaller | median B/A | p90 B/A |",
             "|---|---:|---:|---|---:|---:|"]
    for name, g in result["groups"].items():
        r = g["ratio_b_over_a"]
        shares = f"{_pct(r['larger'])} / {_pct(r['equal'])} / {_pct(r['smaller'])}" if r["n"] else "-"
        stats = (f"{r['median']:.4g} | {r['p90']:.4g}" if r["n"] else "- | -")
        lines.append(f"| {name} | {g['compared']} | {g['identical']} | {shares} | {stats} |")
    for side in ("a", "b"):
        only = result[f"only_in_{side}"]
        if only:
            lines.append(f"\n{len(only)} quantizers only in {side.upper()} (first: {', '.join(only[:3])})")
    if result["largest_differences"]:
        lines += ["", "Largest differences:", "", "| quantizer | A | B | B/A |", "|---|---:|---:|---:|"]
        lines += [f"| {d['quantizer']} | {d['a']:.6g} | {d['b']:.6g} | {d['ratio']:.4g} |" if d["ratio"] is not None
                  else f"| {d['quantizer']} | {d['a']:.6g} | {d['b']:.6g} | - |" for d in result["largest_differences"]]
    lines += _eval_markdown(result.get("eval") or {})
    return "\n".join(lines) + "\n"


def _eval_markdown(ev: dict[str, Any]) -> list[str]:
    if not ev.get("paired"):
        return ["", f"Evaluation not paired: {ev['reason']}"] if ev.get("reason") else []
    unit = UNIT_LABELS[ev["unit"]]
    lines = ["", f"Evaluation, paired over {ev['sequences']} held-out sequences (B - A; |z| > 2: unlikely to be noise):", "",
             "| metric | A | B | B - A ± se | z | sequences where B is lower |", "|---|---:|---:|---:|---:|---:|"]
    for key, label in (("kl", "KL(reference \\|\\| quantized)"), (f"{ev['unit']}_quant", f"quantized, {unit}")):
        d = ev[key]
        se = f" ± {d['se']:.2g}" if d["se"] is not None else ""
        z = f"{d['z']:.2f}" if d["z"] is not None else "-"
        lines.append(f"| {label} | {d['a']:.5g} | {d['b']:.5g} | {d['b_minus_a']:+.3g}{se} | {z} | {_pct(d['b_lower_share'])} |")
    return lines


def output_prefix(out: Path | None, run_a: Path, run_b: Path) -> Path:
    """``--out``, in an existing, writable folder; by default ``RUN_B/analysis/compare-<A>`` (run names are long:
    not in the current folder). Checked before the work."""
    if out is None:
        out = run_b / ANALYSIS / f"compare-{run_a.resolve().name}"
        folder = run_b  # analysis/ is made when the results are written (not in a run that is refused)
    elif not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist", fix="create it, or pass --out in an existing folder")
    else:
        folder = out.parent
    if folder.is_dir() and not os.access(folder, os.W_OK):
        raise UserError(f"cannot write into {folder}", fix="pass --out PREFIX in a writable folder")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepseek_ptq.analysis.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--out", type=Path, help="output prefix for .md and .json")
    parser.add_argument("--top", type=int, default=10, help="largest differences to list")
    opts = parser.parse_args(argv)
    try:
        out = output_prefix(opts.out, opts.run_a, opts.run_b)  # before the work: a bad --out fails at once
        result = compare(load_run(opts.run_a), load_run(opts.run_b), top=opts.top)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    md, js = out.parent / f"{out.name}.md", out.parent / f"{out.name}.json"  # run names hold dots: no with_suffix
    markdown = to_markdown(result)
    try:
        md.parent.mkdir(exist_ok=True)
        md.write_text(markdown)
        write_json(js, result)
    except OSError as err:
        print(f"error: cannot write {md}: {err.strerror}. Fix: pass --out PREFIX in a writable folder", file=sys.stderr)
        return 2
    print(markdown)
    print(f"written: {md}, {js}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
