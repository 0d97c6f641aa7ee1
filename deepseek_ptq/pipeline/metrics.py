"""metrics.json as a type: what every tool that reads a run's metrics gets (torch-free, so the sweep report
stays light). The writers (pipeline/job.py, rundir.mark_failed) write the same keys; README lists them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS = "metrics.json"


@dataclass(frozen=True)
class RunMetrics:
    status: str  # "running" | "ok" | "failed"
    world_size: int | None = None
    calib: str | None = None
    calib_sync: bool | None = None
    calib_experts_ratio: float | None = None  # partial forced routing (None: the mode's own routing)
    quant: str | None = None
    quant_preset: str | None = None
    model: str | None = None
    ckpt_dir: str | None = None
    checkpoint: str | None = None  # the weights, the same at every world size (model.load.checkpoint_id)
    device: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    tokens_calibrated: int | None = None
    calib_tokens_per_s: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] | None = None
    wandb: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    failed_rank: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not name, kept as read

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunMetrics:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names and v is not None}
        return cls(**{"status": "unknown", **known}, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def read(cls, run_dir: Path) -> RunMetrics | None:
        """The run's metrics; None when there is no readable metrics.json."""
        try:
            return cls.from_dict(json.loads((run_dir / METRICS).read_text()))
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None

    @property
    def mode_label(self) -> str:
        ratio = f" r={self.calib_experts_ratio:g}" if self.calib_experts_ratio is not None else ""
        return f"{self.quant}, {self.calib}{ratio}{'+sync' if self.calib_sync else ''}, W={self.world_size}"
