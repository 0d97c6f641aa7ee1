#!/usr/bin/env bash
# DeepSeek-V3.2 on one GPU (issue 17 part 3; figures in benchmarks/NOTES.md), one device call (carry .whl):
#   run: bash benchmarks/v32_gpu.sh
# the bench on ds_v32_slice and on ds_v3_slice (the indexer's cost per batch), resident vs streamed V3.2 runs
# (amax compared), and a profile of a streamed ds_v3_slice run (where a reused layer's time goes).
set -u
OUT=${OUT:-v32_gpu}
RUNS=${RUNS:-/tmp/v32_runs}
mkdir -p "$OUT" "$RUNS"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site TORCH_EXTENSIONS_DIR=/tmp/ext
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$RUNS/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"; tail -12 "$RUNS/$name.log" >> "$OUT/steps.txt"; }
S="logger=none parallel.device=cuda data=synthetic data.seq_len=512 data.batch_size=8 data.num_samples=64 calib=topk"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/steps.txt"
step bench_v32 150 python3 -m deepseek_ptq.devtools.bench --batches 8 --fixup-layers 0 --out "$OUT/bench_v32.json" model=ds_v32_slice
step bench_v3 150 python3 -m deepseek_ptq.devtools.bench --batches 8 --fixup-layers 0 --out "$OUT/bench_v3.json" model=ds_v3_slice
step v32_resident 120 python3 -m deepseek_ptq $S model=ds_v32_slice hydra.run.dir=$RUNS/v32_res
step v32_streamed 120 python3 -m deepseek_ptq $S model=ds_v32_slice calib.layerwise=true hydra.run.dir=$RUNS/v32_str
step v32_compare 60 python3 -m deepseek_ptq.compare $RUNS/v32_res $RUNS/v32_str
python3 - "$RUNS" >> "$OUT/steps.txt" <<'PY'
import sys, torch
from pathlib import Path
from deepseek_ptq.pipeline.rundir import read_amax
r = Path(sys.argv[1]); x, y = read_amax(r / "v32_res", 1), read_amax(r / "v32_str", 1)
print("v32 amax resident vs streamed:", len(x), "buffers,", sum(torch.equal(x[k], y[k]) for k in x), "identical")
PY
step profile_v3 120 python3 -m cProfile -o "$RUNS/prof.out" -m deepseek_ptq $S model=ds_v3_slice model.n_layers=5 \
  calib.layerwise=true hydra.run.dir=$RUNS/prof
python3 -c "import pstats; pstats.Stats('$RUNS/prof.out').sort_stats('cumulative').print_stats(60)" > "$OUT/profile.txt" 2>&1
cp $RUNS/prof/stats/layers.csv "$OUT/profile_layers.csv"
