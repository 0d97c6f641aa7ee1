"""What quantization does to the output: the fake-quantized model against the unquantized one on
held-out batches never used in calibration.

Both forwards run on every rank (the model is sharded; the head gathers full logits everywhere), so every
rank computes the same figures and no rank skips a collective.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from modelopt.torch.quantization.nn import TensorQuantizer
from torch import nn
from tqdm import tqdm

from deepseek_ptq.observe.eval_units import quality_unit


@contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[None]:
    """The unquantized reference: the same modules with every enabled quantizer switched off."""
    enabled = [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.is_enabled]
    for q in enabled:
        q.disable()
    try:
        yield
    finally:
        for q in enabled:
            q.enable()


@dataclass
class SequenceScores:
    """Per held-out sequence: KL(reference || quantized) and both cross-entropies (nats per token), float64."""

    kl: torch.Tensor
    ce_ref: torch.Tensor
    ce_quant: torch.Tensor
    top1_agree: int
    tokens: int


class ScoreAccumulator:
    """The per-sequence figures of batch after batch, from both models' logits on the same tokens."""

    def __init__(self) -> None:
        self.kl: list[torch.Tensor] = []
        self.ce_ref: list[torch.Tensor] = []
        self.ce_quant: list[torch.Tensor] = []
        self.agree = self.n = 0

    @torch.no_grad()
    def add(self, tokens: torch.Tensor, ref_logits: torch.Tensor, quant_logits: torch.Tensor) -> None:
        targets = tokens[:, 1:].reshape(-1)
        ref, quant = _next_token_log_probs(ref_logits), _next_token_log_probs(quant_logits)
        per_seq = (tokens.shape[0], -1)
        self.kl.append((ref.exp() * (ref - quant)).sum(-1).reshape(per_seq).mean(1))
        self.ce_ref.append(F.nll_loss(ref, targets, reduction="none").reshape(per_seq).mean(1))
        self.ce_quant.append(F.nll_loss(quant, targets, reduction="none").reshape(per_seq).mean(1))
        self.agree += int((ref.argmax(-1) == quant.argmax(-1)).sum())
        self.n += targets.numel()

    def scores(self) -> SequenceScores:
        kl, ce_ref, ce_quant = (torch.cat(v).double().cpu() if v else torch.zeros(0, dtype=torch.float64)
                                for v in (self.kl, self.ce_ref, self.ce_quant))
        return SequenceScores(kl, ce_ref, ce_quant, self.agree, self.n)


@torch.no_grad()
def score_sequences(model: nn.Module, batches: list[torch.Tensor], device: torch.device,
                    progress: bool = False) -> SequenceScores:
    """The quantized model against its unquantized self on every held-out sequence."""
    acc = ScoreAccumulator()
    for tokens in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
        tokens = tokens.to(device)
        with quantizers_disabled(model):
            ref = model(tokens, logits=True)
        acc.add(tokens, ref, model(tokens, logits=True))
    return acc.scores()


def summarize(scores: SequenceScores, byte_level: bool) -> dict[str, float | None]:
    """Mean KL, top-1 agreement, and both models' cross-entropy: bits per byte for byte-level vocabularies,
    nats per token otherwise.

    ``kl_se`` and ``*_delta_se`` are standard errors over the held-out sequences (the delta is paired: quantized
    minus reference on the same sequence), so a difference between runs can be told from sampling noise.
    """
    if scores.tokens == 0:
        return {}
    unit, scale = quality_unit(byte_level)
    delta = scores.ce_quant - scores.ce_ref
    return {"kl": float(scores.kl.mean()), "kl_se": standard_error(scores.kl),
            "top1_agreement": scores.top1_agree / scores.tokens, "tokens": scores.tokens, "sequences": len(scores.kl),
            f"{unit}_ref": float(scores.ce_ref.mean()) * scale, f"{unit}_quant": float(scores.ce_quant.mean()) * scale,
            f"{unit}_delta": float(delta.mean()) * scale, f"{unit}_delta_se": _scaled(standard_error(delta), scale)}


def write_sequences(scores: SequenceScores, byte_level: bool, path: Path) -> None:
    """One row per held-out sequence (what ``compare`` pairs between two runs of the same data)."""
    unit, scale = quality_unit(byte_level)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sequence", "kl", f"{unit}_ref", f"{unit}_quant"])
        for i, (kl, ref, quant) in enumerate(zip(scores.kl.tolist(), scores.ce_ref.tolist(), scores.ce_quant.tolist())):
            writer.writerow([i, repr(kl), repr(ref * scale), repr(quant * scale)])


def read_sequences(path: Path) -> dict[str, torch.Tensor] | None:
    """What ``write_sequences`` wrote, column -> float64 values (``kl``, ``<unit>_ref``, ``<unit>_quant``);
    None when there is no such file."""
    if not path.exists():
        return None
    with open(path) as f:
        rows = list(csv.DictReader(f))
    columns = [key for key in (rows[0] if rows else {}) if key != "sequence"]
    return {key: torch.tensor([float(r[key]) for r in rows], dtype=torch.float64) for key in columns}


def standard_error(values: torch.Tensor) -> float | None:
    if len(values) < 2:
        return None  # undefined for one sequence (None, not NaN: metrics.json stays strict JSON)
    return float(values.std() / math.sqrt(len(values)))


def _scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def _next_token_log_probs(logits: torch.Tensor) -> torch.Tensor:
    logits = logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
