"""Shared fixtures: compose configs with Hydra's compose API and run jobs in-process (world size 1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from deepseek_ptq.pipeline.app import CONF_DIR  # noqa: E402  (registers the schema)

FAST = ["data.num_samples=8", "data.seq_len=64", "data.batch_size=4", "logger=none", "eval.enabled=false"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    os.environ["DEEPSEEK_PTQ_CACHE"] = str(path)
    return path


def make_cfg(overrides: list[str], hydra: bool = False):
    """The composed config (``hydra``: with the hydra node, as Hydra's callbacks see it)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra)


def run_job(tmp_path: Path, overrides: list[str]) -> Path:
    """Run one job in-process; returns its run directory."""
    from deepseek_ptq.pipeline.app import execute

    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    execute(make_cfg(with_fast(overrides)), run_dir)
    return run_dir


def with_fast(overrides: list[str]) -> list[str]:
    """FAST settings, except those the caller sets itself (Hydra refuses a group chosen twice)."""
    chosen = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return [f for f in FAST if f.split("=", 1)[0] not in chosen] + overrides


def load_amax(run_dir: Path) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for path in sorted((run_dir / "amax").glob("amax_dict_rank*-mp*.pt")):
        merged.update(torch.load(path))
    return merged


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: on a shared 2-core machine extra torch threads only spin (export 0.7 s vs 5 s measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
