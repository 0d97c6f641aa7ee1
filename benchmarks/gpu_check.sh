#!/usr/bin/env bash
# The GPU checks run before an issue closes, in one device call (see benchmarks/NOTES.md):
#   run: bash benchmarks/gpu_check.sh   (carry .whl: modelopt, hydra, omegaconf... as py3.12 wheels)
# Results under $OUT (default ./gpu_check): pytest logs, two CLI runs, export comparison, bench.json.
set -u
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"; tail -3 "$OUT/$name.log"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$OUT/gpu.txt"
step gpu_tests 200 python3 -m pytest -q -p no:cacheprovider tests/test_fast_path.py tests/test_triton_kernels.py
for run in "topk calib=topk" "topk_plain calib=topk calib.fast=false" "all_experts calib=all_experts" "all_experts_plain calib=all_experts calib.fast=false"; do
  set -- $run
  step "cli_$1" 90 python3 -m deepseek_ptq logger=none parallel.device=cuda hydra.run.dir="$OUT/run_$1" "${@:2}"
done
step compare_topk 60 python3 -m deepseek_ptq.compare "$OUT/run_topk_plain" "$OUT/run_topk" --out "$OUT/compare_topk"
step compare_all 60 python3 -m deepseek_ptq.compare "$OUT/run_all_experts_plain" "$OUT/run_all_experts" --out "$OUT/compare_all"
step export_cuda 90 python3 -m deepseek_ptq.export "$OUT/run_topk" --out /tmp/export_cuda --device cuda
step export_cpu 90 python3 -m deepseek_ptq.export "$OUT/run_topk" --out /tmp/export_cpu --device cpu
(cd /tmp/export_cuda && sha256sum *.safetensors) > "$OUT/export_cuda.sha"; (cd /tmp/export_cpu && sha256sum *.safetensors) > "$OUT/export_cpu.sha"
cmp "$OUT/export_cuda.sha" "$OUT/export_cpu.sha" && echo "export cuda == cpu (bytes)" | tee -a "$OUT/steps.txt"
step bench ${BENCH_S:-170} python3 -m deepseek_ptq.bench --modes topk,all_experts --batches 6 --plain-batches 0 --grouped default --out "$OUT/bench.json"
step fast_vs_plain ${FVP_S:-200} python3 -m deepseek_ptq.devtools.fast_vs_plain --batches 3 --out "$OUT/fvp.json"
rm -rf "$OUT"/run_*/amax  # keep the folder small: metrics.json, logs and stats come back
