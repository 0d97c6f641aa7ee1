"""What a training run of the tiny model leaves besides the checkpoint: the loss curve (PNG and W&B offline),
the measurements of the stored checkpoint, and the model card built from both."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from deepseek_ptq.devtools.train import (
    bits_per_byte,
    corpus_streams,
    expert_loads,
    heldout_windows,
    load_release,
    load_table,
)

log = logging.getLogger(__name__)


def plot_loss(record: dict[str, Any], path: Path) -> None:
    """Training and held-out bits per byte against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = record["steps"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([s["step"] for s in steps], [s["bpb"] for s in steps], lw=1, label="training batch")
    ax.plot([e["step"] for e in record["evals"]], [e["heldout_bpb"] for e in record["evals"]], "o-", ms=3,
            label="held-out files")
    ax.set(xlabel="step", ylabel="bits per byte", ylim=(0, 8), title="tiny DeepSeek-V3, byte-level, Python stdlib")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def log_to_wandb(record: dict[str, Any], wandb_dir: Path, project: str = "deepseek-ptq") -> Path:
    """Log a training record to W&B offline (its files kept inside ``wandb_dir``); returns the run folder."""
    import wandb

    wandb_dir.mkdir(parents=True, exist_ok=True)
    for var, sub in (("WANDB_DATA_DIR", ".data"), ("WANDB_CACHE_DIR", ".cache"), ("WANDB_CONFIG_DIR", ".config")):
        os.environ[var] = str(wandb_dir / sub)
    run = wandb.init(project=project, job_type="train_tiny", mode="offline", dir=str(wandb_dir),
                     config=record["config"], settings=wandb.Settings(console="off", silent=True))
    try:
        rows: dict[int, dict[str, float]] = {}
        for s in record["steps"]:
            rows.setdefault(s["step"], {}).update({
                "train/bpb": s["bpb"], "train/balance_loss": s["balance_loss"], "train/grad_norm": s["grad_norm"],
                "train/lr": s["lr"], "time_s": s["time_s"],
                **{f"load_max_over_min/moe{i}": v for i, v in enumerate(s["load_max_over_min"])}})
        for e in record["evals"]:
            rows.setdefault(e["step"] - 1, {})["heldout/bpb"] = e["heldout_bpb"]
        for step in sorted(rows):  # W&B wants steps in increasing order
            run.log(rows[step], step=step)
        run.summary.update({f"final/{k}": v for k, v in record.get("final", {}).items()})
        run.summary["train_seconds"] = record.get("train_seconds")
        return Path(run.dir).parent
    finally:
        run.finish()


def measure_stored(ckpt_dir: Path, corpus: str | None, seq_len: int) -> dict[str, Any]:
    """The stored checkpoint on the CPU, loaded as the runner loads it: held-out bits per byte (whole held-out
    files in windows of ``seq_len``) and routed-token counts on the runner's default calibration set."""
    from deepseek_ptq.pipeline.config import DataConfig
    from deepseek_ptq.pipeline.data import make_batches

    device = torch.device("cpu")
    model = load_release(ckpt_dir, device)
    _, held_stream, _, _ = corpus_streams(corpus)
    held = heldout_windows(held_stream, seq_len)
    data = DataConfig(paths=sorted(str(p) for p in Path(corpus).glob("*.py")) if corpus else [])
    calib = make_batches(data, model.args.vocab_size, None, 0).calib
    loads = expert_loads(model, calib, device)
    return {"heldout_bpb_fp8_storage_cpu": bits_per_byte(model, held, 16, device), "heldout_windows": len(held),
            "seq_len": seq_len, "calibration_set": {"num_samples": data.num_samples, "seq_len": data.seq_len,
                                                   "seed": data.seed},
            "expert_loads": loads, "load_table": load_table(loads)}


def _best_eval_note(record: dict[str, Any]) -> str:
    best = min(record["evals"], key=lambda e: e["heldout_bpb"])
    last = record["evals"][-1]
    if best is last:
        return "Held-out bits per byte fell until the last step."
    return (f"Held-out bits per byte was lowest at step {best['step']} ({best['heldout_bpb']:.3f}) and rose to "
            f"{last['heldout_bpb']:.3f} by step {last['step']} as the model fit its {record['train_bytes'] / 1e6:.1f} MB of training text; "
            "the stored model is the last step (nothing was selected on held-out data).")


def _exact_rule_note(record: dict[str, Any], exact: dict[str, Any] | None) -> str:
    """The same training with DeepSeek's rule exactly (band 1), run beside this one, as a comparison."""
    if exact is None:
        return ""
    tail = exact["steps"][-10:]
    ours = record["steps"][-10:]
    mean = lambda rows: sum(max(r["load_max_over_min"]) for r in rows) / len(rows)  # noqa: E731
    return f"""
## The band against DeepSeek's rule exactly

Trained beside this model on the same device, with the same seed, steps and data, but `--balance-band 1`
(`train_log_exact_rule.json`): held-out {exact['final']['heldout_bpb_fp8_storage']:.3f} bits per byte (FP8 storage) against
{record['final']['heldout_bpb_fp8_storage']:.3f} here; over the last {len(tail)} logged training batches the largest max/min expert load of a
layer averaged {mean(tail):.2f} (exact rule) against {mean(ours):.2f} (band {record['config']['balance_band']}). On data like its training data
the exact rule leaves every expert nearly equally busy, which is what a calibration comparison must not assume.
"""


def model_card(record: dict[str, Any], measured: dict[str, Any], command: str,
               exact_rule: dict[str, Any] | None = None) -> str:
    cfg, final = record["config"], record["final"]
    rows = "\n".join(f"| {r['layer']} | {r['tokens']} | {r['min']} | {r['max']} | {r['max_over_min']:.2f} | {r['cv']:.2f} |"
                     for r in measured["load_table"])
    calib = measured["calibration_set"]
    return f"""# tiny DeepSeek-V3 (trained), the runner's default model (`model=tiny`)

The architecture of `deepseek_ptq/model/configs/tiny.json` (dim 256, 4 layers: 1 dense + 3 MoE, MLA attention,
16 routed experts in 4 groups with 2 kept, top-4, sigmoid routing with selection bias, 2 shared experts),
byte vocabulary (256), trained on a Python standard library's top-level `*.py` files (`{cfg['corpus'] or 'this Python'}`).

## How it was made

    {command}

- Device: {record['device']}, torch {record['torch']}; {record['steps_done']} steps of {cfg['batch_size']} x {cfg['seq_len']} bytes
  in {record['train_seconds']:.0f} s of training; seed {cfg['seed']} (initialisation and data order).
- Data: {record['train_files']} calibration-split files ({record['train_bytes']:,} bytes) for training; the {len(record['heldout_files'])} held-out
  files of `deepseek_ptq.pipeline.data` ({', '.join(record['heldout_files'])}; {record['heldout_bytes']:,} bytes in windows) never seen in training.
- Precision: fp32 master weights and AdamW (lr {cfg['lr']}, cosine to {cfg['min_lr_ratio']}x, {cfg['warmup_steps']} warm-up steps,
  weight decay {cfg['weight_decay']}, clip {cfg['grad_clip']}), forward and backward under bf16 autocast.
- Routing balance as DeepSeek-V3: selection-bias update of speed {cfg['bias_gamma']} after every step (bias for selection only),
  with a tolerance band of {cfg['balance_band']}x around the mean load (1 would be DeepSeek's rule exactly: loads inside the
  band are left alone, so the bias stops collapse without flattening expert popularity), plus the sequence-wise balance
  loss with alpha {cfg['seq_balance_alpha']}.
- Stored as DeepSeek releases weights: every Linear weight float8_e4m3fn with float32 128x128 block scales, embedding,
  gate weight, head and norms bf16, gate bias fp32 (`model0-mp1.safetensors`, `config.json`).
  The loss curve is `loss.png`; the full record `train_log.json` (W&B offline: `--replay-wandb train_log.json`,
  since wandb was not installed on the training device).

## Held-out bits per byte (uniform guessing: 8)

Whole held-out files in windows of {cfg['seq_len']} bytes, every predicted position counted.

| model | held-out bits per byte | where |
|---|---|---|
| bf16 (before FP8 storage) | {final['heldout_bpb_bf16']:.3f} | training device |
| FP8 storage | {final['heldout_bpb_fp8_storage']:.3f} | training device |
| FP8 storage, loaded from this folder | {measured['heldout_bpb_fp8_storage_cpu']:.3f} | CPU, `--measure` |

{_best_eval_note(record)}

## Expert load on the default calibration set

Routed tokens per expert (each token counted once per chosen expert) on the runner's default calibration set
({calib['num_samples']} samples x {calib['seq_len']} bytes, seed {calib['seed']}, the calibration split of the standard library).

| MoE layer | routed tokens | min per expert | max per expert | max / min | coeff. of variation |
|---|---|---|---|---|---|
{rows}

Per expert: `train_log.json` is the training record; `measured.json` holds these counts.
{_exact_rule_note(record, exact_rule)}"""
