#!/usr/bin/env bash
# One device call (issues 16, 18, 19; figures in benchmarks/NOTES.md): every GPU test; resident vs streamed on 4
# layers of 671B geometry; then each calibration recipe on 2 layers (1 dense + 1 MoE) of that geometry, resident,
# 4 batches of 8 x 512 tokens, timed against the default. Steps that would start after 470 s are skipped.
#   run: bash benchmarks/recipes_gpu.sh     (carry .whl: modelopt, hydra, omegaconf... as py3.12 wheels)
set -u
OUT=${OUT:-recipes_gpu} RUNS=${RUNS:-/tmp/recipes_runs} STOP_AFTER=${STOP_AFTER:-470}
. benchmarks/device_lib.sh
step gpu_tests 200 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/
grep -E "passed|failed|FAILED|Error" "$RUNS/gpu_tests.log" | tail -15 > "$OUT/gpu_tests.txt"
SLICE="model=ds_v3_slice data.seq_len=512 data.batch_size=8"
run slice4_resident_topk 90 $SLICE data.num_samples=64 calib=topk
run slice4_streamed_topk 90 $SLICE data.num_samples=64 calib=topk calib.layerwise=true
TWO="$SLICE model.n_layers=2 model.n_dense_layers=1 data.num_samples=32"
run r_nvfp4 60 $TWO quant=nvfp4
run r_nvfp4_experts 60 $TWO quant=nvfp4_experts
run r_nvfp4_routed_fp8_shared 60 $TWO quant=nvfp4_routed_fp8_shared
run r_ratio_0.5 60 $TWO quant=nvfp4 calib.experts_ratio=0.5
run r_nvfp4_4o6 60 $TWO quant=nvfp4_4o6
run r_nvfp4_local_hessian 90 $TWO quant=nvfp4_local_hessian
run r_nvfp4_mse 120 $TWO quant=nvfp4_mse
python3 benchmarks/layerwise_results.py "$RUNS" > "$OUT/results.json"
python3 - "$RUNS" > "$OUT/recipes.txt" <<'PY'
import json, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).glob("r_*")):
    if (run / "metrics.json").exists():
        m = json.loads((run / "metrics.json").read_text())
        t = m.get("timings_s", {})
        print(run.name, m.get("status"), "calibrate_s", round(t.get("calibrate", 0), 2), "per_batch_s",
              round(t.get("calibrate", 0) / 4, 3), "peak_gpu_gb", m.get("memory", {}).get("max_peak_gpu_gb"),
              (m.get("error") or "")[:300])
PY
cat "$OUT/recipes.txt" "$OUT/gpu_tests.txt"; tail -c 1500 "$OUT/results.json"
