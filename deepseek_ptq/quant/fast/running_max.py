"""Running maxima kept on the device during calibration, merged into modelopt's max calibrators at the end.

modelopt's ``MaxCalibrator.collect(x)`` keeps ``max(previous, max |x|)`` in x's dtype and checks each value
with host syncs. Keeping the same maxima on the device (float32 holds every bf16/fp16 value exactly) and
merging them once gives the calibrator the same state without a sync per call.
"""

from __future__ import annotations

import torch

from deepseek_ptq.quant.nonfinite import NonFiniteActivations

NOTHING_SEEN = float("-inf")


class RunningMax:
    """max |x| over every x passed to ``update``; -inf until a non-empty x arrives."""

    def __init__(self, device: torch.device) -> None:
        self.value = torch.full((), NOTHING_SEEN, dtype=torch.float32, device=device)
        self.dtype: torch.dtype | None = None

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return  # modelopt's quantizer returns early on an empty input, collecting nothing
        self.dtype = x.dtype
        # max |x| in one pass without an |x| temporary (the inf-norm); the same value as x.abs().amax()
        torch.maximum(self.value, torch.linalg.vector_norm(x, float("inf")).float(), out=self.value)


def merge_into_calibrators(targets: list[list], values: torch.Tensor, dtype: torch.dtype,
                           names: list[str] | None = None) -> None:
    """Give every quantizer in ``targets[i]`` the state ``collect`` of inputs with max |x| = ``values[i]`` gives.

    ``values`` is float32 on the device, -inf where nothing was seen (those calibrators are left alone, as
    the plain path leaves the calibrator of an expert without tokens). One host sync for all of them.
    A NaN or inf raises ``NonFiniteActivations`` naming the first such target (``names[i]``, when given).
    """
    host = values.cpu()
    bad = torch.isnan(host) | (host == float("inf"))
    if bad.any():
        first = int(bad.nonzero()[0, 0])
        raise NonFiniteActivations(names[first] if names else None)
    on_device = values.to(dtype)
    for i, quantizers in enumerate(targets):
        if host[i] == NOTHING_SEEN:
            continue
        for q in quantizers:
            if q.is_enabled and q._if_calib and not q._dynamic:
                cal = q._calibrator
                amax = on_device[i].clone()
                cal._calib_amax = amax if cal._calib_amax is None else torch.max(cal._calib_amax, amax)
