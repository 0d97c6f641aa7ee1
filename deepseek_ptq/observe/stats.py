"""Statistics of one calibration, computed on rank 0 from every rank's share.

Per quantizer: amax before and after the fixup and why it changed (calibrated, peer_max, tp_max, rank_max,
weight_fill, fused_max). Per MoE layer and expert: routed tokens (with calib.experts_ratio: the tokens its
quantizers saw, forced ones included). Per expert linear: how much the peer-max sync
raised its input amax (synced / own), the figure that decides between calibration modes.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepseek_ptq.common import natural_key

_QUANTIZER = re.compile(r"^layers\.(?P<layer>\d+)\.(?P<block>attn|ffn)\.(?P<rest>.+)\.(?P<role>\w+)_quantizer$")
_EXPERT = re.compile(r"^experts\.(?P<expert>\d+)\.(?P<linear>\w+)$")
# The MLA KV cache's quantizers (quant/modules.py, QuantMLA): kind attn.kv_cache, role kv_bmm (latent) or pe_bmm.
_KV_CACHE = re.compile(r"^layers\.(?P<layer>\d+)\.attn\.(?P<role>kv_bmm|pe_bmm)_quantizer$")


@dataclass(frozen=True)
class QuantizerPath:
    """What a quantizer's module path says: ``layers.3.ffn.experts.17.w2.input_quantizer``."""

    layer: int | None
    kind: str  # expert.w2, shared.w1, dense.w3, attn.wq_b, attn.kv_cache, or the module path outside the layers
    expert: int | None
    role: str  # input, weight, output; kv_bmm, pe_bmm (the KV cache's latent and rotary key)

    @classmethod
    def parse(cls, name: str) -> QuantizerPath:
        if kv := _KV_CACHE.match(name):
            return cls(int(kv["layer"]), "attn.kv_cache", None, kv["role"])
        m = _QUANTIZER.match(name)
        if m is None:
            module, _, role = name.rpartition(".")
            return cls(None, module, None, role.removesuffix("_quantizer"))
        layer, rest = int(m["layer"]), m["rest"]
        if m["block"] == "attn":
            return cls(layer, f"attn.{rest}", None, m["role"])
        if e := _EXPERT.match(rest):
            return cls(layer, f"expert.{e['linear']}", int(e["expert"]), m["role"])
        if rest.startswith("shared_experts."):
            return cls(layer, f"shared.{rest.removeprefix('shared_experts.')}", None, m["role"])
        return cls(layer, f"dense.{rest}", None, m["role"])


@dataclass(frozen=True)
class AmaxRow:
    quantizer: str
    rank: int
    path: QuantizerPath
    before: float | None  # after calibration, before the fixup
    after: float | None
    source: str  # calibrated, peer_max, tp_max, rank_max, weight_fill, fused_max, missing, disabled


@dataclass
class RunStats:
    amax: list[AmaxRow]
    tokens: dict[int, list[int]]  # MoE layer -> routed (or statistics) tokens of each expert (all ranks)
    tokens_per_expert_slot: int  # tokens x top-k (or x the statistics experts): what each layer's counts sum to
    summary: dict[str, Any] = field(default_factory=dict)

    def expert_rows(self, linear: str, role: str = "input") -> list[AmaxRow]:
        return [r for r in self.amax if r.path.kind == f"expert.{linear}" and r.path.role == role]


def ratio_summary(ratios: Iterable[float]) -> dict[str, Any]:
    """Shares of ratios above, at and below 1, with median, p90 and max: the validation's table cells."""
    values = sorted(ratios)
    n = len(values)
    if n == 0:
        return {"n": 0}
    return {"n": n,
            "larger": sum(v > 1 for v in values) / n,
            "equal": sum(v == 1 for v in values) / n,
            "smaller": sum(v < 1 for v in values) / n,
            "median": _quantile(values, 0.5), "p90": _quantile(values, 0.9), "max": values[-1]}


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def collect(gathered: list[dict[str, Any]], tokens: dict[int, list[int]], tokens_per_expert_slot: int) -> RunStats:
    """Merge the ranks' amax tables (a tensor-parallel quantizer appears once, from the lowest rank)."""
    rows: dict[str, AmaxRow] = {}
    for rank, g in enumerate(gathered):
        missing = set(g["missing"])
        for name in set(g["before"]) | set(g["after"]) | set(g["summary"]):
            if name in rows:
                continue
            unset = "missing" if name in missing else "disabled"
            source = g["sources"].get(name, "calibrated" if name in g["before"] else unset)
            rows[name] = AmaxRow(name, rank, QuantizerPath.parse(name), g["before"].get(name), g["after"].get(name), source)
    stats = RunStats([rows[n] for n in sorted(rows, key=natural_key)], tokens, tokens_per_expert_slot)
    stats.summary = _summarize(stats)
    return stats


def _sync_ratios(rows: list[AmaxRow]) -> list[float]:
    return [r.after / r.before for r in rows if r.before and r.after is not None]


def _summarize(stats: RunStats) -> dict[str, Any]:
    sources: dict[str, int] = {}
    for r in stats.amax:
        sources[r.source] = sources.get(r.source, 0) + 1
    per_layer = {str(layer): {"min": min(c), "max": max(c), "mean": sum(c) / len(c), "without_tokens": c.count(0),
                              "total": sum(c)}
                 for layer, c in stats.tokens.items()}
    return {
        "amax_sources": dict(sorted(sources.items())),
        "expert_input_sync_ratio": {w: ratio_summary(_sync_ratios(stats.expert_rows(w))) for w in ("w1", "w2", "w3")},
        "expert_tokens": per_layer,
        "experts_without_tokens": [f"layers.{layer}.ffn.experts.{e}" for layer, c in stats.tokens.items()
                                   for e, n in enumerate(c) if n == 0],
    }


def amax_by_layer(stats: RunStats, role: str, when: str = "after") -> dict[str, dict[int, list[float]]]:
    """kind -> layer -> amax values ``before`` or ``after`` the fixup (one per expert for expert kinds)."""
    out: dict[str, dict[int, list[float]]] = {}
    for r in stats.amax:
        value = getattr(r, when)
        if r.path.role == role and r.path.layer is not None and value is not None:
            out.setdefault(r.path.kind, {}).setdefault(r.path.layer, []).append(value)
    return out


def write_csv(stats: RunStats, stats_dir: Path) -> None:
    stats_dir.mkdir(exist_ok=True)
    _write(stats_dir / "amax.csv", ["quantizer", "rank", "layer", "kind", "expert", "role", "amax_before",
                                    "amax_after", "source"],
           ([r.quantizer, r.rank, r.path.layer, r.path.kind, r.path.expert, r.path.role, r.before, r.after, r.source]
            for r in stats.amax))
    _write(stats_dir / "expert_tokens.csv", ["layer", "expert", "tokens"],
           ([layer, e, n] for layer, c in stats.tokens.items() for e, n in enumerate(c)))
    _write(stats_dir / "expert_input_sync.csv", ["layer", "expert", "linear", "amax_own", "amax_synced", "ratio"],
           ([r.path.layer, r.path.expert, r.path.kind.removeprefix("expert."), r.before, r.after,
             r.after / r.before if r.before and r.after is not None else None]
            for w in ("w1", "w2", "w3") for r in stats.expert_rows(w)))
    _write(stats_dir / "amax_by_layer.csv", ["role", "kind", "layer", "n", "min", "median", "max"],
           ([role, kind, layer, len(v), min(v), _quantile(sorted(v), 0.5), max(v)]
            for role in ("input", "weight") for kind, layers in amax_by_layer(stats, role).items()
            for layer, v in sorted(layers.items())))


def _write(path: Path, header: list[str], rows: Iterable[list[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
