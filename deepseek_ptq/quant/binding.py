"""Calibration-time behaviour bound onto module instances for a while, then taken off exactly.

The model classes carry no calibration state: calibration code binds instance attributes (a forward, a
method) or registers hooks for the duration of one pass, and ``restore`` puts back what each instance had.
"""

from __future__ import annotations

from typing import Any

_ABSENT = object()


class Bindings:
    """Instance attributes set by ``bind`` and hooks added by ``hook``, undone (newest first) by ``restore``."""

    def __init__(self) -> None:
        self._undo: list = []

    def bind(self, obj: Any, name: str, value: Any) -> None:
        """``obj.name = value`` on the instance (shadowing its class's attribute) until ``restore``."""
        previous = obj.__dict__.get(name, _ABSENT)
        object.__setattr__(obj, name, value)
        self._undo.append((obj, name, previous))

    def hook(self, handle) -> None:
        """A hook handle (``register_forward_pre_hook`` and the like), removed by ``restore``."""
        self._undo.append(handle)

    def restore(self) -> None:
        while self._undo:
            entry = self._undo.pop()
            if not isinstance(entry, tuple):
                entry.remove()
                continue
            obj, name, previous = entry
            if previous is _ABSENT:
                del obj.__dict__[name]
            else:
                object.__setattr__(obj, name, previous)
