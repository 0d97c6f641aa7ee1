"""What a layer-streamed run keeps after its layers so that a stopped run can finish without redoing them.

Each rank writes ``resume/rank{r}-mp{W}-layer{k}.pt`` (k: the next layer to calibrate) atomically and keeps the
last two, so that a run killed while the ranks were writing still has a layer every rank holds. The files carry a
fingerprint of the config: a resume with another model, data or recipe is refused. They are not run artifacts:
a failed run keeps them (that is their use), a finished one removes them.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from deepseek_ptq.errors import UserError
from deepseek_ptq.files import atomic_write, torch_save
from deepseek_ptq.pipeline.rundir import FREE_ON_RESUME

RESUME_DIR = "resume"
KEEP = 2


@dataclass
class StreamState:
    next_layer: int
    amax: dict[str, torch.Tensor]
    records: list[dict[str, Any]]
    tokens: dict[int, list[int]]
    hidden: list[torch.Tensor]  # the next layer's calibration inputs
    heldout_ref: list[torch.Tensor]  # held-out hidden states, unquantized and quantized
    heldout_quant: list[torch.Tensor]
    layers: list[dict[str, Any]] = field(default_factory=list)  # per-layer timings so far


def fingerprint(cfg: Any) -> str:
    """A digest of everything that decides the numbers (not where they are logged)."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for dotted in FREE_ON_RESUME:
        *parents, last = dotted.split(".")
        node = container
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    return hashlib.sha256(repr(sorted(_flatten(container))).encode()).hexdigest()[:16]


def _flatten(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        return [item for k, v in node.items() for item in _flatten(v, f"{prefix}{k}.")]
    return [(prefix, repr(node))]


def _path(run_dir: Path, rank: int, world_size: int, next_layer: int) -> Path:
    return run_dir / RESUME_DIR / f"rank{rank}-mp{world_size}-layer{next_layer:04d}.pt"


def _saved_layers(run_dir: Path, rank: int, world_size: int) -> list[int]:
    pattern = re.compile(rf"rank{rank}-mp{world_size}-layer(\d+)\.pt")
    folder = run_dir / RESUME_DIR
    found = [pattern.fullmatch(p.name) for p in folder.iterdir()] if folder.is_dir() else []
    return sorted(int(m.group(1)) for m in found if m)


def save(run_dir: Path, rank: int, world_size: int, digest: str, state: StreamState) -> None:
    """This rank's state after a layer; older states beyond the last ``KEEP`` are removed."""
    path = _path(run_dir, rank, world_size, state.next_layer)
    path.parent.mkdir(exist_ok=True)
    payload = {"fingerprint": digest, **state.__dict__,
               "hidden": [h.cpu() for h in state.hidden], "heldout_ref": [h.cpu() for h in state.heldout_ref],
               "heldout_quant": [h.cpu() for h in state.heldout_quant]}
    try:
        atomic_write(path, lambda tmp: torch_save(payload, tmp))
    except OSError as err:
        raise UserError(f"cannot write the resume state {path}: {err.strerror} (the state after layer "
                        f"{_saved_layers(run_dir, rank, world_size)[-1:] or 'none'} is kept)",
                        fix="free disk space under the run directory, or set calib.resume_every=0") from err
    for old in _saved_layers(run_dir, rank, world_size)[:-KEEP]:
        _path(run_dir, rank, world_size, old).unlink(missing_ok=True)


def load(run_dir: Path, rank: int, world_size: int, digest: str, device: torch.device,
         hidden_on_host: bool = False) -> StreamState | None:
    """The latest state every rank holds (one collective at W > 1, entered by all); None: nothing to resume.
    ``hidden_on_host``: the calibration hidden states stay on the host (the caller pins them)."""
    layers = _saved_layers(run_dir, rank, world_size)
    common = set(layers)
    if world_size > 1:
        every: list[list[int] | None] = [None] * world_size
        dist.all_gather_object(every, layers)
        common = set.intersection(*(set(x or []) for x in every))
    if not common:
        return None
    payload = torch.load(_path(run_dir, rank, world_size, max(common)), map_location="cpu", weights_only=False)
    if payload.pop("fingerprint") != digest:
        raise UserError(f"the resume state in {run_dir / RESUME_DIR} was written by a run with another config",
                        fix="resume with the same overrides as the stopped run, or drop calib.resume to start afresh")
    for key in ("hidden", "heldout_ref", "heldout_quant"):
        if not (key == "hidden" and hidden_on_host):
            payload[key] = [h.to(device) for h in payload[key]]
    return StreamState(**payload)


def remove(run_dir: Path) -> None:
    """A finished run needs no resume state (rank 0, once every rank has finished: the folder is shared)."""
    shutil.rmtree(run_dir / RESUME_DIR, ignore_errors=True)
