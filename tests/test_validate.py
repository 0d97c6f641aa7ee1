"""Checks before any rank starts and any weight is read (pipeline/validate.py): one console line with the fix,
in seconds, the traceback in run.log only."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from conftest import make_cfg
from test_cli import TINY, assert_failed, cli

from deepseek_ptq.errors import UserError
from deepseek_ptq.model.checkpoint import shard_name
from deepseek_ptq.model.load import PACKAGE_DIR, PACKAGED, resolve_args
from deepseek_ptq.pipeline.config import check_known_keys
from deepseek_ptq.pipeline.data import check_text

TINY_SHARD = PACKAGE_DIR / "tiny" / shard_name(0, 1)


def _ckpt_with_config(folder: Path, **changes) -> Path:
    """The packaged tiny checkpoint (linked) with a config.json of its own, changed by ``changes``."""
    folder.mkdir()
    (folder / shard_name(0, 1)).symlink_to(TINY_SHARD)
    (folder / "config.json").write_text(json.dumps({**json.loads((PACKAGED / "tiny.json").read_text()), **changes}))
    return folder


@pytest.fixture(scope="module")
def binary_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "python.bin"
    shutil.copy(Path(sys.executable).resolve(), path)  # an executable: what a wrong glob picks up
    return path


LATE_CHECKS = {
    "no samples": (["data.num_samples=0"], ["data.num_samples=0", "Fix: set data.num_samples"]),
    "no sequence": (["data.seq_len=0"], ["data.seq_len=0", "Fix: set data.seq_len"]),
    "longer than the model": (["data.seq_len=20000"], ["max_seq_len=16384", "at most 16384"]),
    "FP8 blocks split across 8 ranks": (["parallel=mp8"], ["8 ranks", "128-wide FP8 block", "parallel=mp4"]),
    "binary data": (["data.paths=[{binary}]"], ["python.bin", "not text"]),
    "checkpoint config disagrees": (["model.ckpt_dir={ckpt}"], ["route_scale=2.5/1.0", "model.config=null"]),
    "typo added with +": (["+data.num_sample=4"], ["data.num_sample", "did you mean data.num_samples", "seq_len"]),
    "evaluation without samples": (["eval.enabled=true", "eval.num_samples=0"], ["eval.num_samples=0"]),
}


@pytest.mark.parametrize("case", list(LATE_CHECKS))
def test_bad_input_fails_before_the_model_in_seconds(tmp_path, cache_dir, binary_file, case):
    overrides, words = LATE_CHECKS[case]
    ckpt = _ckpt_with_config(tmp_path / "ckpt", route_scale=1.0) if "checkpoint" in case else None
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    result = cli(run_dir, *[o.format(binary=binary_file, ckpt=ckpt) for o in overrides], "logger=none", timeout=60)
    elapsed = time.perf_counter() - start
    assert_failed(result, run_dir, *words)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("[ERROR]")]
    assert len(errors) == 1 and "Fix: " in errors[0], result.stderr[-3000:]
    # Before any weight was read (no load bar), before any rank was spawned; the traceback kept in run.log.
    assert "load model0" not in result.stderr and "spawning" not in (run_dir / "run.log").read_text()
    assert "Traceback" in (run_dir / "run.log").read_text()
    assert elapsed < 10, f"{case}: {elapsed:.1f} s"


def test_a_checkpoint_config_that_agrees_is_accepted(tmp_path, cache_dir):
    # The same model spelled in both files (config.json carries more keys, defaults included): no refusal.
    same = _ckpt_with_config(tmp_path / "same", max_batch_size=8)
    assert resolve_args(make_cfg([f"model.ckpt_dir={same}"]).model) == TINY
    # The checkpoint's own config when model.config is dropped: what the refusal's fix says.
    other = _ckpt_with_config(tmp_path / "other", route_scale=1.0)
    with pytest.raises(UserError, match="describe different models"):
        resolve_args(make_cfg([f"model.ckpt_dir={other}"]).model)
    assert resolve_args(make_cfg([f"model.ckpt_dir={other}", "model.config=null"]).model).route_scale == 1.0
    # The command line's model.* overrides are part of the model compared (a checkpoint of fewer layers).
    assert resolve_args(make_cfg([f"model.ckpt_dir={other}", "model.route_scale=1.0"]).model).route_scale == 1.0


@pytest.mark.parametrize("override, key", [("+model.n_layer=2", "model.n_layer"), ("+foo=1", "foo"),
                                           ("+logger.modes=online", "logger.modes"), ("+eval.samples=3", "eval.samples")])
def test_keys_added_with_plus_are_refused(override, key):
    cfg = make_cfg([override])  # Hydra itself lets them in
    with pytest.raises(UserError, match=f"unknown config key {key}"):
        check_known_keys(cfg)
    check_known_keys(make_cfg([]))  # the shipped config holds no unknown key


def test_text_check():
    check_text(Path("a.txt"), "naïve café, 漢字, ünïcödé\n".encode() * 100)
    check_text(Path("a.txt"), b"x" * 200 + b"\xe9")  # one stray Latin-1 byte in 201: below the 1% threshold
    with pytest.raises(UserError, match="NUL bytes"):
        check_text(Path("b.bin"), b"text\0more")
    with pytest.raises(UserError, match="invalid UTF-8"):
        check_text(Path("latin1.txt"), "déjà été élevé à côté ".encode("latin-1") * 20)
