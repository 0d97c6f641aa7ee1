"""Per-layer timings of a layer-streamed run: ``stats/layers.csv`` and the figures the summary names."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

# forward_s: the part of calibrate_s spent in the passes over the batches (the rest: modelopt's conversion and
# bookkeeping); converted: 1 where the layer's block was converted by modelopt, 0 where it took over the previous
# layer's converted modules (quant/reuse.py)
# wall_s: the layer's whole step (the columns before it, plus its records and resume state)
COLUMNS = ("layer", "load_s", "read_s", "read_wait_s", "calibrate_s", "forward_s", "fixup_s", "eval_s", "wall_s",
           "converted")
# resume state written by versions without these columns (they converted every layer)
_DEFAULTS = {"converted": 1.0, "wall_s": 0.0}


def layer_summary(gathered: list[dict[str, Any]], stats_dir: Path) -> dict[str, Any]:
    """Each layer's seconds, the slowest rank's (every rank waits for it at the layer's fixup), written as
    ``layers.csv``; returns the slowest layer and the share of the layer time spent reading weights."""
    by_layer: dict[int, dict[str, float]] = {}
    for g in gathered:
        for entry in g["layers"]:
            row = by_layer.setdefault(entry["layer"], {k: 0.0 for k in COLUMNS[1:]})
            for key in COLUMNS[1:]:
                row[key] = max(row[key], entry.get(key, _DEFAULTS[key]) if key in _DEFAULTS else entry[key])
    stats_dir.mkdir(parents=True, exist_ok=True)
    with open(stats_dir / "layers.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for layer in sorted(by_layer):
            row = by_layer[layer]
            writer.writerow([layer] + [f"{row[k]:.4f}" for k in COLUMNS[1:-1]] + [int(row["converted"])])
    if not by_layer:
        return {"layers": 0}
    totals = {layer: row["wall_s"] or row["load_s"] + row["calibrate_s"] + row["fixup_s"] + row["eval_s"]
              for layer, row in by_layer.items()}
    slowest = max(totals, key=totals.get)
    layer_time = sum(totals.values())
    read = sum(row["read_s"] for row in by_layer.values())
    wait = sum(row["read_wait_s"] for row in by_layer.values())
    return {"layers": len(by_layer), "slowest_layer": slowest, "slowest_layer_s": totals[slowest],
            "layer_s": layer_time, "read_s": read, "read_wait_s": wait,
            "forward_s": sum(row["forward_s"] for row in by_layer.values()),
            "converted_layers": sum(int(row["converted"]) for row in by_layer.values()),
            # reading runs beside the compute: the share that held the stream up is the wait's
            "read_wait_share": wait / layer_time if layer_time > 0 else 0.0}
