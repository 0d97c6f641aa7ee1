"""The fast calibration path, entered through one seam (quant/fast/calib.py has the details).

    reason = why_not(model, method)          # None: the fast path reproduces the plain path here
    with fast_calibration(model, all_experts, FastOptions(...)) as fc:
        ...forward passes...
        fc.flush()
"""

from deepseek_ptq.quant.fast.calib import FastCalibration, fast_calibration, in_use, why_not
from deepseek_ptq.quant.fast.options import FastOptions, Grouped

__all__ = ["FastCalibration", "FastOptions", "Grouped", "fast_calibration", "in_use", "why_not"]
