"""The run directory contract (see README): metrics.json with a status, logs, and the artifacts; what each rank
contributes and what rank 0 writes from all of them; and the one reader of a finished run for the tools.

A run owns its folder: ``claim`` takes it (an owner file created with O_EXCL, locked while the run lives)
before anything is written there, and refuses a folder another run owns or that holds anything else.
metrics.json is written atomically: "running" at the start, "ok" only when everything is written,
"failed" (with the error) otherwise, in which case finished-looking artifacts are removed.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deepseek_ptq.common import natural_key
from deepseek_ptq.errors import UserError
from deepseek_ptq.files import torch_save, write_json
from deepseek_ptq.pipeline.metrics import METRICS, RunMetrics

log = logging.getLogger(__name__)

ARTIFACTS = ("amax", "stats", "plots", ".quant_summary.txt", "hf_quant_config.json", "summary.md")
OWNER = ".owner"  # who claimed the folder (JSON); flock-ed by that process for as long as it lives


# ---------------------------------------------------------------------------------------------- who owns the folder


class RunDirTaken(UserError):
    """The folder belongs to another run (or holds files of one): a time-stamped name can try the next one."""


@dataclass
class Claim:
    """A run's hold on its folder: the owner file's descriptor, whose lock ends with the process (even SIGKILL)."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def claim(run_dir: Path, resume: bool = False, overrides: list[str] | None = None) -> Claim:
    """Make ``run_dir`` this run's own before anything is written there (the first of two racing runs wins).

    A folder that does not exist or is empty is taken; one that another run owns (running, finished or
    failed) or that holds any other file is refused, untouched. ``resume``: a folder whose run did not finish,
    whose process is gone and whose Hydra overrides were ``overrides`` (calib.resume aside) is taken over.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / OWNER, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    except FileExistsError:
        if not run_dir.is_dir():
            raise UserError(f"the run directory {run_dir} is a file", fix="pass a folder as hydra.run.dir") from None
        if not resume:
            raise _taken(run_dir) from None
        return _take_over(run_dir, overrides)
    except OSError as err:
        raise UserError(f"cannot write the run directory {run_dir}: {err.strerror}",
                        fix="pass a writable folder as hydra.run.dir (or make this one writable)") from None
    if not _lock(fd):  # a resume locked the new file first: it is that run's now
        os.close(fd)
        raise _taken(run_dir)
    others = sorted(p.name for p in run_dir.iterdir() if p.name != OWNER)
    if others:  # an earlier run's files (one from before owner files, or a folder of the user's)
        os.close(fd)
        (run_dir / OWNER).unlink(missing_ok=True)
        raise RunDirTaken(f"the run directory {run_dir} already holds files ({', '.join(others[:4])}"
                          f"{', ...' if len(others) > 4 else ''})", fix=_TAKEN_FIX.format(run_dir=run_dir))
    _write_owner(fd)
    return Claim(run_dir, fd)


_TAKEN_FIX = "pass another hydra.run.dir, or remove {run_dir}"


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _write_owner(fd: int) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv,
             "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)


def _read_owner(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / OWNER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # being written by a run that claims it this instant


def _in_use(run_dir: Path) -> bool:
    """Whether the owner's process is alive (it holds the lock), asked without taking the lock from anyone."""
    try:
        fd = os.open(run_dir / OWNER, os.O_RDONLY)
    except OSError:
        return False
    try:
        if not _lock(fd):
            return True
        return not _read_owner(run_dir)  # no owner written yet: a run is claiming the folder right now
    finally:
        os.close(fd)  # (releases the lock just taken)


def _taken(run_dir: Path) -> RunDirTaken:
    status = read_metrics(run_dir).get("status")
    owner = _read_owner(run_dir)
    if _in_use(run_dir):
        who = f" (pid {owner['pid']} on {owner['host']}, started {owner['started']})" if owner else ""
        return RunDirTaken(f"the run directory {run_dir} is in use by another run{who}",
                           fix="pass another hydra.run.dir: that run is still going")
    what = {"ok": "a finished run", "failed": "a failed run"}.get(status or "", "a run that stopped without finishing")
    return RunDirTaken(f"the run directory {run_dir} holds {what}", fix=_TAKEN_FIX.format(run_dir=run_dir))


def _take_over(run_dir: Path, overrides: list[str] | None) -> Claim:
    """A resume: the earlier run's folder, if that run is over, did not finish, and had these overrides."""
    fd = os.open(run_dir / OWNER, os.O_RDWR)
    try:
        if not _lock(fd) or not _read_owner(run_dir):
            raise _taken(run_dir)
        if read_metrics(run_dir).get("status") == "ok":
            raise RunDirTaken(f"the run directory {run_dir} holds a finished run: nothing to resume",
                              fix="pass another hydra.run.dir for a new run")
        previous = _hydra_overrides(run_dir)
        if overrides is not None and previous is not None and _but_resume(previous) != _but_resume(overrides):
            raise RunDirTaken(f"the run in {run_dir} had other overrides ({', '.join(previous) or 'none'})",
                              fix="resume with that run's overrides, or pass another hydra.run.dir")
    except BaseException:
        os.close(fd)
        raise
    _write_owner(fd)
    return Claim(run_dir, fd)


def _hydra_overrides(run_dir: Path) -> list[str] | None:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return None
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


# Config keys that may differ between a run and its resume (calib.resume=true): where it logs, and the resume
# switches themselves. They change no number; the resume state's fingerprint ignores them too (pipeline/resume.py).
FREE_ON_RESUME = ("logger", "log_level", "calib.resume", "calib.resume_every", "calib.hidden_on_host")


def _but_resume(overrides: list[str]) -> list[str]:
    def free(override: str) -> bool:
        key = override.split("=", 1)[0].lstrip("+~")
        return any(key == k or key.startswith(k + ".") for k in FREE_ON_RESUME)
    return [o for o in overrides if not free(o)]


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


# ``extra=BRIEF``: a record whose traceback belongs in the log file only (a user error: one line on the console).
BRIEF = {"brief": True}


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "brief", False) and record.exc_info:
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return super().format(record)


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
    console.setFormatter(_ConsoleFormatter("[%(levelname)s] %(message)s" if rank == 0 else f"[rank{rank} %(levelname)s] %(message)s"))
    console.setLevel(level if rank == 0 else logging.WARNING)
    root.addHandler(console)
    for noisy in ("matplotlib", "PIL", "urllib3", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------- what ranks write


def amax_path(run_dir: Path, rank: int, world_size: int) -> Path:
    return run_dir / "amax" / f"amax_dict_rank{rank}-mp{world_size}.pt"


def host_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[t.cpu() for t in tensors]`` in one device-to-host transfer per device and dtype: a transfer per tensor
    waits for the device each time, seconds for the thousands of quantizers of one 671B layer."""
    out: list[torch.Tensor | None] = [t.cpu() if t.device.type == "cpu" else None for t in tensors]
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        if out[i] is None:
            groups.setdefault((t.device, t.dtype), []).append(i)
    for members in groups.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in members]).cpu()
        for i, part in zip(members, flat.split([tensors[i].numel() for i in members])):
            out[i] = part.view(tensors[i].shape)
    return out  # type: ignore[return-value]


def amax_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantizer buffer (amax, AWQ pre-quant scales) keyed by module path, on the CPU."""
    items = [(k, v.detach()) for k, v in model.state_dict().items() if "_quantizer." in k]
    return dict(zip([k for k, _ in items], host_copies([v for _, v in items])))


def save_amax(state: dict[str, torch.Tensor], run_dir: Path, rank: int, world_size: int) -> Path:
    """This rank's quantizer state (``amax_state``'s dict) as the run directory keeps it."""
    path = amax_path(run_dir, rank, world_size)
    path.parent.mkdir(exist_ok=True)
    torch_save(state, path)  # a full disk raises its OSError
    return path


def quantizer_lines(model: nn.Module) -> dict[str, str]:
    """modelopt's quant-summary line of every quantizer on this rank."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    quantizers = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, TensorQuantizer)]
    # modelopt formats each amax with .item(): read from host copies made in one transfer, then put back.
    held = [(mod, key, mod._buffers[key]) for _, mod in quantizers for key in ("_amax", "_pre_quant_scale")
            if isinstance(mod._buffers.get(key), torch.Tensor) and mod._buffers[key].device.type != "cpu"]
    for (mod, key, _), copy in zip(held, host_copies([t for _, _, t in held])):
        mod._buffers[key] = copy
    try:
        return {name: f"{name:80} {mod}" for name, mod in quantizers}
    finally:
        for mod, key, tensor in held:
            mod._buffers[key] = tensor


def write_quant_summary(per_rank: list[dict[str, str]], run_dir: Path) -> int:
    """The summary of the whole model: each quantizer once (shards of a tensor-parallel layer show rank 0's)."""
    merged: dict[str, str] = {}
    for lines in per_rank:
        for name, line in lines.items():
            merged.setdefault(name, line)
    ordered = [merged[n] for n in sorted(merged, key=natural_key)]
    (run_dir / ".quant_summary.txt").write_text("\n".join(ordered + [f"{len(ordered)} TensorQuantizers found in model"]) + "\n")
    return len(ordered)


def unquantized_linears(model: nn.Module) -> list[str]:
    from deepseek_ptq.quant.modules import quantized_linears

    return [name for name, m in quantized_linears(model)
            if not m.weight_quantizer.is_enabled and not m.input_quantizer.is_enabled]


def gather_to_all(obj: Any, world_size: int) -> list[Any]:
    """Every rank's object, on every rank (one collective, entered by all)."""
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------- what tools read


def read_finished(run_dir: Path) -> RunMetrics:
    """metrics.json of a run that finished; one clear error for a folder that is not one, or a run that failed."""
    metrics = RunMetrics.read(run_dir)
    if metrics is None:
        raise UserError(f"{run_dir} is not a run directory (no readable metrics.json)",
                        fix="pass the folder a calibration run wrote")
    if metrics.status != "ok":
        raise UserError(f"run {run_dir} has status {metrics.status!r}: {metrics.error or 'not finished'}",
                        fix="use a run that finished (status ok in its metrics.json)")
    return metrics


def read_amax(run_dir: Path, world_size: int) -> dict[str, torch.Tensor]:
    """Every rank's quantizer state in one dict, keyed as saved: the max over the ranks that hold a key (the
    shards of a tensor-parallel layer hold the same amax after the fixup; a difference is logged)."""
    merged: dict[str, torch.Tensor] = {}
    differing = []
    for rank in range(world_size):
        path = amax_path(run_dir, rank, world_size)
        if not path.exists():
            raise UserError(f"{path} does not exist (world size {world_size})",
                            fix="the run directory is incomplete: re-run it")
        for key, value in torch.load(path, map_location="cpu", weights_only=True).items():
            if key in merged:
                if not torch.equal(merged[key], value):
                    differing.append(key)
                merged[key] = torch.maximum(merged[key], value)
            else:
                merged[key] = value
    if differing:
        log.warning("%d amax differ between ranks (their max is used): %s", len(differing), ", ".join(differing[:5]))
    return merged
