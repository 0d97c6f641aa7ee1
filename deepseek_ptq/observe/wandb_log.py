"""The job's Weights & Biases run (rank 0 only).

Offline by default, with every W&B folder (run, data, cache, config) inside the run directory, so a run
needs no account and no network and leaves nothing in ~/.cache or ~/.local. W&B trouble is logged and
never fails the job: an experiment runner must not lose a finished calibration to a dashboard. An online
start is bounded by logger.init_timeout_s (W&B's own default waits 90 s without a network) and falls back
to an offline run, to be synced later; WANDB_MODE=disabled turns W&B off as logger=none does.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from deepseek_ptq.common import choice
from deepseek_ptq.observe.stats import RunStats

log = logging.getLogger(__name__)


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics as ``a/b`` keys, scalars only (W&B charts and summaries take scalars)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)) or value is None:
            out[name] = value
    return out


def run_name(run_dir: Path) -> str:
    """What the command-line overrides chose (Hydra records them), else the run folder's name."""
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.exists():
        chosen = [o for o in OmegaConf.load(overrides) if not str(o).startswith(("hydra.", "model.ckpt_dir"))]
        return ",".join(map(str, chosen)) or "defaults"
    return run_dir.name


def sweep_group(run_dir: Path) -> str | None:
    """Jobs of one Hydra multirun share its sweep folder, which holds multirun.yaml."""
    sweep = run_dir.parent
    return f"{sweep.parent.name}/{sweep.name}" if (sweep / "multirun.yaml").exists() else None


class Tracker:
    """A W&B run, or nothing (logger=none, or W&B failed to start). Every method is safe to call."""

    def __init__(self, run: Any = None, init_s: float = 0.0, online_error: str | None = None) -> None:
        self.run = run
        self.init_s = init_s  # seconds starting W&B took, a failed online start included
        self.online_error = online_error  # why an online start fell back to offline

    @property
    def info(self) -> dict[str, Any] | None:
        if self.run is None:
            return None
        offline = self.run.settings.mode == "offline"
        run_dir = Path(self.run.dir).parent  # .../wandb/offline-run-<time>-<id>/files -> the run folder
        info = {"mode": self.run.settings.mode, "id": self.run.id, "dir": str(run_dir),
                "sync_command": f"wandb sync {run_dir}" if offline else None,
                "url": None if offline else self.run.url}
        if self.online_error is not None:
            info["online_error"] = self.online_error
        return info

    def log_results(self, metrics: dict[str, Any], stats: RunStats, plots: list[Path], run_dir: Path) -> None:
        if self.run is None:
            return
        try:
            self._log(metrics, stats, plots, run_dir)
        except Exception as err:  # noqa: BLE001 - W&B must never fail a finished run
            log.warning("W&B logging failed (the run directory is complete): %s", err)

    def _log(self, metrics: dict[str, Any], stats: RunStats, plots: list[Path], run_dir: Path) -> None:
        import numpy as np
        import wandb

        data: dict[str, Any] = {}
        for role in ("input", "weight"):
            kinds: dict[str, list[float]] = {}
            for r in stats.amax:
                if r.path.role == role and r.after is not None:
                    kinds.setdefault(r.path.kind, []).append(r.after)
            for kind, values in sorted(kinds.items()):
                data[f"amax/{role}/{kind}"] = wandb.Histogram(np.asarray(values), num_bins=64)
        data["experts"] = expert_table(stats)
        layers = run_dir / "stats" / "layers.csv"
        if layers.exists():  # a layer-streamed run: each layer's seconds
            data["layers"] = csv_table(layers)
        for path in plots:
            data[f"plots/{path.stem}"] = wandb.Image(str(path))
        self.run.log(data)
        self.run.summary.update(flatten(metrics))
        artifact = wandb.Artifact(f"calibration-{self.run.id}", type="calibration",
                                  metadata={"quant": metrics.get("quant"), "calib": metrics.get("calib"),
                                            "calib_experts_ratio": metrics.get("calib_experts_ratio"),
                                            "world_size": metrics.get("world_size")})
        for name in (".quant_summary.txt", "hf_quant_config.json", "run.log"):
            if (run_dir / name).exists():
                artifact.add_file(str(run_dir / name), name=name)
        for folder in ("amax", "stats"):
            if (run_dir / folder).is_dir():
                artifact.add_dir(str(run_dir / folder), name=folder)
        self.run.log_artifact(artifact)

    def update_summary(self, metrics: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(flatten(metrics))
        except Exception as err:  # noqa: BLE001
            log.warning("W&B summary update failed: %s", err)

    def finish(self, exit_code: int) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as err:  # noqa: BLE001
            log.warning("W&B finish failed: %s", err)
        self.run = None


def csv_table(path: Path):
    """A CSV file of numbers as a W&B table (its header as the columns)."""
    import wandb

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return wandb.Table(columns=rows[0], data=[[float(v) for v in row] for row in rows[1:]])


def expert_table(stats: RunStats):
    """One row per routed expert: tokens, input amax before/after the fixup and weight amax of w1, w2, w3."""
    import wandb

    by_expert: dict[tuple[int, int], dict[str, Any]] = {}
    for r in stats.amax:
        if r.path.expert is None or r.path.layer is None:
            continue
        row = by_expert.setdefault((r.path.layer, r.path.expert), {})
        linear = r.path.kind.removeprefix("expert.")
        if r.path.role == "input":
            row[f"{linear}_input_before"], row[f"{linear}_input_after"] = r.before, r.after
        elif r.path.role == "weight":
            row[f"{linear}_weight"] = r.after
    value_columns = [f"{w}_{c}" for w in ("w1", "w2", "w3") for c in ("input_before", "input_after", "weight")]
    table = wandb.Table(columns=["layer", "expert", "tokens", *value_columns])
    for (layer, expert), values in sorted(by_expert.items()):
        counts = stats.tokens.get(layer)
        table.add_data(layer, expert, counts[expert] if counts else None, *(values.get(c) for c in value_columns))
    return table


def _keep_wandb_inside(run_dir: Path) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")  # our own end-of-run summary says where the run is
    base = run_dir / "wandb"
    for var, sub in (("WANDB_DIR", None), ("WANDB_DATA_DIR", ".data"), ("WANDB_CACHE_DIR", ".cache"),
                     ("WANDB_CONFIG_DIR", ".config")):
        path = base / sub if sub else run_dir
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)


def start(cfg: Any, run_dir: Path) -> Tracker:
    mode = choice(cfg.logger.mode)
    if choice(cfg.logger.name) != "wandb" or mode == "disabled":
        return Tracker()
    if os.environ.get("WANDB_MODE") == "disabled":  # W&B's own switch, set by clusters and CI for every tool
        log.info("WANDB_MODE=disabled: no W&B run")
        return Tracker()
    start_time = time.perf_counter()
    try:
        import wandb

        _keep_wandb_inside(run_dir)
        if mode != "online":
            return Tracker(_init(wandb, cfg, run_dir, mode), time.perf_counter() - start_time)
        before = set((run_dir / "wandb").glob("run-*"))
        try:
            return Tracker(_init(wandb, cfg, run_dir, "online"), time.perf_counter() - start_time)
        except Exception as err:  # noqa: BLE001 - no network, no account, a server down: offline instead
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            log.warning("W&B did not start online in %.1f s (%s): logging offline instead; upload the run later "
                        "with the wandb sync command in the summary", time.perf_counter() - start_time, reason)
            for unstarted in set((run_dir / "wandb").glob("run-*")) - before:  # not a run: never synced by mistake
                shutil.rmtree(unstarted, ignore_errors=True)
            return Tracker(_init(wandb, cfg, run_dir, "offline"), time.perf_counter() - start_time, reason)
    except Exception as err:  # noqa: BLE001 - a broken install, an unwritable folder: the run goes on
        log.warning("W&B did not start (%s); the run continues without it. Set logger=none to skip W&B.", err)
        return Tracker(init_s=time.perf_counter() - start_time)


def _init(wandb: Any, cfg: Any, run_dir: Path, mode: str) -> Any:
    return wandb.init(
        project=cfg.logger.project, entity=cfg.logger.entity, mode=mode, dir=str(run_dir),
        group=cfg.logger.group or sweep_group(run_dir), job_type=choice(cfg.calib.name),
        name=run_name(run_dir), tags=list(cfg.logger.tags) or None,
        config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), reinit="finish_previous",
        # (the bound is for the server: an offline start waits on nothing but W&B's local service)
        settings=wandb.Settings(console="off", silent=True, x_save_requirements=False,
                                **({"init_timeout": cfg.logger.init_timeout_s} if mode == "online" else {})))


@contextmanager
def tracking(cfg: Any, run_dir: Path, rank0: bool) -> Iterator[Tracker]:
    """A Tracker for the job on rank 0; finished in every case (exit code 1 when the job failed)."""
    tracker = start(cfg, run_dir) if rank0 else Tracker()
    try:
        yield tracker
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish(exit_code=0)
