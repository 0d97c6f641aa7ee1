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


@torch.no_grad()
def score_sequences(model: nn.Module, batches: list[torch.Tensor], device: torch.device,
                    progress: bool = False) -> SequenceScores:
    """The quantized model against its unquantized self on every held-out sequence."""
    kl_seq, ref_seq, quant_seq = [], [], []
    agree = n = 0
    for tokens in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
        tokens = tokens.to(device)
        targets = tokens[:, 1:].reshape(-1)
        with quantizers_disabled(model):
            ref = _next_token_log_probs(model, tokens)
        quant = _next_token_log_probs(model, tokens)
        per_seq = (tokens.shape[0], -1)
        kl_seq.append((ref.exp() * (ref - quant)).sum(-1).reshape(per_seq).mean(1))
        ref_seq.append(F.nll_loss(ref, targets, reduction="none").reshape(per_seq).mean(1))
        quant_seq.append(F.nll_loss(quant, targets, reduction="none").reshape(per_seq).mean(1))
        agree += int((ref.argmax(-1) == quant.argmax(-1)).sum())
        n += targets.numel()
    kl, ce_ref, ce_quant = (torch.cat(v).double().cpu() if v else torch.zeros(0, dtype=torch.float64)
                            for v in (kl_seq, ref_seq, quant_seq))
    return SequenceScores(kl, ce_ref, ce_quant, agree, n)


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


def _next_token_log_probs(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens, logits=True)[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
