"""Names and units of the evaluation's figures, for the tools that read them without torch (report)."""

from __future__ import annotations

import math

# Metric prefix -> what its cross-entropies are in
UNIT_LABELS = {"bpb": "bits/byte", "ce": "nats/token"}
SEQUENCES_CSV = "eval_sequences.csv"


def quality_unit(byte_level: bool) -> tuple[str, float]:
    """(metric prefix, factor from nats per token): bits per byte for byte-level vocabularies."""
    return ("bpb", 1 / math.log(2)) if byte_level else ("ce", 1.0)
