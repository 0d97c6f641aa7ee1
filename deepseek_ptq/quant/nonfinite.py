"""Non-finite activations during calibration, recognised by type.

They surface in two places: modelopt's ``MaxCalibrator.collect`` asserts on a NaN or inf amax inside a
quantizer's call, and the fast path's running maxima (quant/fast/running_max.py) find them when merged.
``guard_quantizers`` turns the first into ``NonFiniteActivations`` (the quantizer's input is checked only
once its call has failed, so a healthy pass pays nothing); the fast path raises it itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from deepseek_ptq.quant.binding import Bindings


class NonFiniteActivations(Exception):
    """NaN or inf among the activations a quantizer observed; ``where``: the quantizer, when known."""

    def __init__(self, where: str | None = None) -> None:
        super().__init__(f"non-finite activations{f' at {where}' if where else ''}")
        self.where = where


def _non_finite(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all())


def _guarded(name: str, forward):
    def call(x, *args, **kwargs):
        try:
            return forward(x, *args, **kwargs)
        except (AssertionError, RuntimeError) as err:
            if _non_finite(x):
                raise NonFiniteActivations(name) from err
            raise
    return call


@contextlib.contextmanager
def guard_quantizers(model: nn.Module) -> Iterator[None]:
    """While open, a quantizer whose call fails on a non-finite input raises ``NonFiniteActivations``."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    bindings = Bindings()
    try:
        for name, module in model.named_modules():
            if isinstance(module, TensorQuantizer):
                bindings.bind(module, "forward", _guarded(name, module.forward))
        yield
    finally:
        bindings.restore()
