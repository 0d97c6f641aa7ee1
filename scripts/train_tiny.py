"""Train the tiny DeepSeek-V3 (the runner's default model), or finish what a training run left.

    python scripts/train_tiny.py --out OUT --corpus .corpus/python3.11          # train (one GPU: minutes)
    python scripts/train_tiny.py --measure deepseek_ptq/model/tiny --corpus ...  # CPU figures + MODEL_CARD.md
    python scripts/train_tiny.py --replay-wandb OUT/train_log.json               # W&B offline from the log
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from deepseek_ptq.devtools.train import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for the checkpoint, config.json, train_log.json and loss.png")
    parser.add_argument("--measure", metavar="DIR", help="measure a stored checkpoint on the CPU and write its MODEL_CARD.md")
    parser.add_argument("--replay-wandb", metavar="LOG", help="log a train_log.json to W&B offline")
    parser.add_argument("--wandb-dir", default="outputs/train_tiny", help="where W&B offline runs are written")
    parser.add_argument("--card-only", action="store_true", help="with --measure: reuse measured.json, rewrite the card")
    parser.add_argument("--command", help="with --measure: the training command to quote in the card")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "out_dir":
            continue
        kind = {"corpus": str}.get(f.name, type(f.default))
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from deepseek_ptq.devtools import train_report

    if opts.replay_wandb:
        record = json.loads(Path(opts.replay_wandb).read_text())
        print("W&B offline run:", train_report.log_to_wandb(record, Path(opts.wandb_dir)))
        return 0
    if opts.measure:
        ckpt = Path(opts.measure)
        record = json.loads((ckpt / "train_log.json").read_text())
        measured_path = ckpt / "measured.json"
        if opts.card_only and measured_path.exists():  # rewrite the card from the last measurement
            measured = json.loads(measured_path.read_text())
        else:
            measured = train_report.measure_stored(ckpt, opts.corpus, record["config"]["seq_len"])
            measured_path.write_text(json.dumps(measured, indent=1) + "\n")
        command = opts.command or record.get("command", "python scripts/train_tiny.py")
        exact_path = ckpt / "train_log_exact_rule.json"
        exact = json.loads(exact_path.read_text()) if exact_path.exists() else None
        (ckpt / "MODEL_CARD.md").write_text(train_report.model_card(record, measured, command, exact))
        print(json.dumps({k: v for k, v in measured.items() if k != "expert_loads"}, indent=1))
        return 0
    if not opts.out:
        parser.error("give --out (train), --measure DIR or --replay-wandb LOG")

    from deepseek_ptq.devtools.train import train

    values = {f.name: getattr(opts, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "out_dir"}
    cfg = TrainConfig(out_dir=opts.out, **values)
    record = train(cfg, command=" ".join(["python scripts/train_tiny.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]))
    train_report.plot_loss(record, Path(opts.out) / "loss.png")
    try:
        import wandb  # noqa: F401
    except ImportError:
        logging.info("wandb is not installed here: replay later with --replay-wandb %s/train_log.json", opts.out)
    else:
        print("W&B offline run:", train_report.log_to_wandb(record, Path(opts.wandb_dir)))
    print(json.dumps(record["final"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
