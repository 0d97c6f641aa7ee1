"""Small helpers every stage uses: stable ordering of module paths, plain values of config choices."""

from __future__ import annotations

import re
from typing import Any

_NUM = re.compile(r"(\d+)")


def natural_key(name: str) -> list[Any]:
    """layers.2 before layers.10, experts.3 before experts.12."""
    return [int(p) if p.isdigit() else p for p in _NUM.split(name)]


def choice(value: Any) -> Any:
    """The plain string of an enum choice: a spawned rank rebuilds its config from YAML, where enums are strings."""
    return getattr(value, "value", value)
