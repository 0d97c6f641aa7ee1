"""The end of a sweep (Hydra multirun): one line naming the jobs that failed, and a non-zero exit.

A failing job records ``failed`` and the sweep goes on to the next (app._record_failure); without this the
command would exit 0 however many jobs failed. Registered in conf/config.yaml (hydra.callbacks).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from deepseek_ptq.pipeline.metrics import RunMetrics


class SweepOutcome(Callback):
    """Each job's run directory and whether it ended ``ok``, as the jobs end (in this process: Hydra's basic
    launcher; a launcher that runs jobs elsewhere calls on_job_end there, and this reports nothing)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Path, bool]] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.runtime.output_dir)
        metrics = RunMetrics.read(run_dir)
        ok = job_return.status == JobStatus.COMPLETED and metrics is not None and metrics.status == "ok"
        self.jobs.append((run_dir, ok))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = [str(run_dir) for run_dir, ok in self.jobs if not ok]
        if failed:
            print(f"deepseek-ptq: {len(failed)} of {len(self.jobs)} jobs failed: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)  # (SystemExit passes Hydra's callback wrapper, which warns on Exception only)
