"""The Hydra callback that makes the run's folder (a sweep's folder with ``-m``) its own before Hydra writes there.

Hydra creates hydra.run.dir and writes .hydra/ into it before the task starts, so the claim (rundir.claim)
cannot wait for app.execute: it would come after a losing run had rewritten the winner's .hydra/. A folder
named by the time of day (the default, ``${now:%H-%M-%S}``) that is taken gets a counter after the time
(``12-00-01.2_quant=fp8``), so that two plain runs started in one second both run; any other folder that is
taken is refused: one line naming the folder and the fix, exit 1, nothing written to the folder (metrics.json
there is the other run's).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from deepseek_ptq.errors import UserError
from deepseek_ptq.pipeline.launch import joined_rank
from deepseek_ptq.pipeline.rundir import Claim, RunDirTaken, claim

TIME_OF_DAY = "${now:%H-%M-%S}"
MAX_COUNTER = 1000


class ClaimRunDir(Callback):
    """Configured in conf/config.yaml (hydra.callbacks); holds the claim until the run or sweep ends."""

    def __init__(self) -> None:
        self._claim: Claim | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._claim = _claim_or_exit(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._claim = _claim_or_exit(config, "sweep")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def _release(self) -> None:
        if self._claim is not None:
            self._claim.release()
            self._claim = None


def _claim_or_exit(config: DictConfig, mode: str) -> Claim | None:
    """The claim, or exit 1 with the error on the console (Hydra turns an exception in a callback into a warning)."""
    joined = joined_rank()
    if joined is not None and joined.rank != 0:
        return None  # rank 0's folder is shared with this rank after start-up (launch.rank_main)
    try:
        return claim_folder(config, mode)
    except UserError as err:
        print(f"[ERROR] {err}", file=sys.stderr)
        sys.exit(1)
    except Exception:  # a bug: no run without its claim (Hydra would only warn and go on)
        traceback.print_exc()
        sys.exit(1)


def claim_folder(config: DictConfig, mode: str) -> Claim:
    """Claim hydra.<mode>.dir; a time-stamped one that is taken moves to the next free counter (recorded in the
    config, and for a sweep in the overrides its jobs are composed from)."""
    node = config.hydra[mode]
    pattern = OmegaConf.to_container(node, resolve=False)["dir"]
    resume = bool(OmegaConf.select(config, "calib.resume", default=False))
    overrides = [str(o) for o in config.hydra.overrides.task]
    if TIME_OF_DAY not in pattern:
        return claim(Path(str(node.dir)), resume, overrides)
    for counter in range(1, MAX_COUNTER + 1):
        if counter > 1:
            with read_write(node):
                node.dir = pattern.replace(TIME_OF_DAY, f"{TIME_OF_DAY}.{counter}", 1)  # `now` is cached: same time
        try:
            owned = claim(Path(str(node.dir)), resume, overrides)
        except RunDirTaken:
            continue
        if counter > 1 and mode == "sweep":
            _set_hydra_override(config, "hydra.sweep.dir", str(node.dir))
        return owned
    raise UserError(f"{MAX_COUNTER} folders named {Path(str(node.dir)).parent}/<time>.N are taken",
                    fix=f"pass hydra.{mode}.dir")


def _set_hydra_override(config: DictConfig, key: str, value: str) -> None:
    """Each sweep job's config is composed again from hydra.overrides.hydra: the chosen folder must be there."""
    quoted = "'" + value.replace("'", "\\'") + "'"
    kept = [o for o in config.hydra.overrides.hydra if str(o).split("=", 1)[0] != key]
    with read_write(config.hydra.overrides), open_dict(config.hydra.overrides):
        config.hydra.overrides.hydra = [*kept, f"{key}={quoted}"]
