# Sourced by the device scripts of benchmarks/: the carried wheels installed, and two helpers.
#   step NAME LIMIT_S CMD...   run CMD under a time limit, log to $RUNS/NAME.log, one line to $OUT/steps.txt
#   run NAME LIMIT_S OVERRIDES...   a deepseek_ptq run on the GPU (synthetic data, no logger) in $RUNS/NAME
# A step that would start after $STOP_AFTER seconds (default: never) is skipped, so the call ends in its limit.
# .whl holds py3.12 wheels of what the GPU image lacks (seen 2026-12-07): nvidia-modelopt 0.47.0, hydra-core 1.3.8,
# omegaconf 2.3.1, antlr4-python3-runtime 4.9.3 (a wheel built from its sdist), pulp, nvidia-ml-py, pydantic
# 2.13.4, pydantic_core 2.46.4, annotated-types, typing-inspection. No wandb: name test files that do not import it.
OUT=${OUT:-device_out}
RUNS=${RUNS:-/tmp/device_runs}
rm -rf "$RUNS"  # a warm machine keeps the last call's runs: each run folder must be new
mkdir -p "$OUT" "$RUNS"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  if [ "$SECONDS" -gt "${STOP_AFTER:-999999}" ]; then echo "$name skipped (time)" | tee -a "$OUT/steps.txt"; return; fi
  timeout "$limit" "$@" > "$RUNS/$name.log" 2>&1; local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"; tail -3 "$RUNS/$name.log"; }
run() { local name=$1 limit=$2; shift 2
  step "$name" "$limit" python3 -m deepseek_ptq logger=none parallel.device=cuda data=synthetic \
    hydra.run.dir="$RUNS/$name" "$@"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/steps.txt"
