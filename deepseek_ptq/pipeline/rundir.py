"""The run directory contract (see README): metrics.json with a status, logs, and the artifacts.

metrics.json is written atomically: "running" at the start, "ok" only when everything is written,
"failed" (with the error) otherwise, in which case finished-looking artifacts are removed.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from deepseek_ptq.files import write_json

METRICS = "metrics.json"
ARTIFACTS = ("amax", "stats", "plots", ".quant_summary.txt", "hf_quant_config.json", "summary.md")


def read_metrics(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / METRICS).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    write_json(run_dir / METRICS, metrics)


def mark_failed(run_dir: Path, error: BaseException | str, rank: int | None = None) -> None:
    """Record the first failure of the job (a later, secondary error from another rank does not replace it)."""
    metrics = read_metrics(run_dir)
    if metrics.get("status") == "failed":
        return
    message = str(error) if isinstance(error, BaseException) else error
    metrics.update(status="failed", error=message, error_type=type(error).__name__ if isinstance(error, BaseException) else "Error")
    if rank is not None:
        metrics["failed_rank"] = rank
    if isinstance(error, BaseException) and error.__traceback__ is not None:
        metrics["traceback"] = "".join(traceback.format_exception(error))[-4000:]
    for name in ARTIFACTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    write_metrics(run_dir, metrics)


def setup_logging(run_dir: Path, rank: int, level: str = "INFO") -> None:
    """Rank 0 logs to run.log and the console, rank r to rank{r}.log (warnings also to the console)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    file_handler = logging.FileHandler(run_dir / ("run.log" if rank == 0 else f"rank{rank}.log"))
    file_handler.setFormatter(fmt)
    root.addHandler(file_handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("[%(levelname)s] %(message)s" if rank == 0 else f"[rank{rank} %(levelname)s] %(message)s"))
    console.setLevel(level if rank == 0 else logging.WARNING)
    root.addHandler(console)
    for noisy in ("matplotlib", "PIL", "urllib3", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
