#!/usr/bin/env bash
# Issues 16 and 19 on one GPU (figures in benchmarks/NOTES.md), two device calls (carry .whl: modelopt, hydra,
# omegaconf... as py3.12 wheels):
#   run: PART=A bash benchmarks/final_gpu.sh   (H200: the resident run needs 110 GB) the GPU tests (the SwiGLU amax
#        kernel, resume with the hidden states on the host, the static-block backend against modelopt's kernel);
#        the kernel against torch's ops at 671B shapes; resident vs streamed amax on 4 layers of 671B geometry
#        (top-k); all-experts on 6 layers, 1024 x 512 tokens, 16 sequences a batch, hidden states on the host
#   run: PART=B bash benchmarks/final_gpu.sh   (H100 or H200) the static-block backend against modelopt's kernel
#        (tests/test_nvfp4_static.py -m gpu); each recipe on 2 layers of 671B geometry against the default; the
#        tiny default's static-block recipes (their amax come back, for benchmarks/static_scales_compare.py
#        against the CPU backend's runs)
set -u
STOP_AFTER=${STOP_AFTER:-540}
. benchmarks/device_lib.sh
SLICE="model=ds_v3_slice data.seq_len=512 data.batch_size=8"
# PART=AB runs both in one call (on an H100: RESIDENT_LAYERS=3, 1 dense + 2 MoE, about 76 GB resident).
LAYERS=${RESIDENT_LAYERS:-4}
if [ "${PART:-A}" != B ]; then
  step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu -rs --durations=15 tests/test_fast_path.py \
    tests/test_triton_kernels.py tests/test_nvfp4_static.py tests/test_span_reader.py
  step gpu_tests_layerwise 120 python3 -m pytest -q -p no:cacheprovider -m gpu -rs --durations=5 tests/test_layerwise.py
  grep -hE "passed|failed|FAILED|Error|SKIP|[0-9.]+s (call|setup)" "$RUNS"/gpu_tests*.log > "$OUT/gpu_tests.txt"
  step bench_swiglu 40 python3 scripts/bench_swiglu.py --out "$OUT/bench_swiglu.json"
  run slice4_resident_topk 75 $SLICE model.n_layers=$LAYERS data.num_samples=64 calib=topk
  run slice4_streamed_topk 60 $SLICE model.n_layers=$LAYERS data.num_samples=64 calib=topk calib.layerwise=true
  run l6_all_experts_b16_host 120 model=ds_v3_slice data.seq_len=512 data.batch_size=16 data.num_samples=1024 \
    model.n_layers=6 model.n_dense_layers=3 calib=all_experts calib.layerwise=true calib.resume_every=0 \
    calib.hidden_on_host=true
  cp "$RUNS/l6_all_experts_b16_host/stats/layers.csv" "$OUT/l6_all_experts_b16_host_layers.csv" 2>/dev/null
fi
if [ "${PART:-A}" != A ]; then
  # What no call has run yet comes first (the last call's time ran out before mse, local Hessian and the ratio);
  # nvfp4 is the baseline every recipe is timed against, on the same machine.
  step gpu_static_test 150 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_nvfp4_static.py
  grep -hE "passed|failed|FAILED|Error|SKIP" "$RUNS"/gpu_static_test.log > "$OUT/gpu_static_test.txt"
  TWO="$SLICE model.n_layers=2 model.n_dense_layers=1 data.num_samples=32"
  for q in nvfp4 nvfp4_mse nvfp4_local_hessian; do
    run "r_$q" 60 $TWO quant=$q
  done
  run r_ratio_0.5 40 $TWO quant=nvfp4 calib.experts_ratio=0.5
  # The tiny default model with its default text data, as the CPU runs of the same recipes: amax back in one archive.
  for q in nvfp4_4o6 nvfp4_mse nvfp4_local_hessian; do
    step "tiny_$q" 60 python3 -m deepseek_ptq logger=none parallel.device=cuda quant=$q eval.num_samples=256 \
      hydra.run.dir="$RUNS/tiny_$q"
  done
  (cd "$RUNS" && tar czf "$OUT/tiny_static_gpu.tgz" tiny_*/amax tiny_*/metrics.json tiny_*/run.log 2>/dev/null)
  for q in nvfp4_experts nvfp4_routed_fp8_shared nvfp4_4o6; do  # (measured on an H100 already)
    run "r_$q" 60 $TWO quant=$q
  done
fi
python3 benchmarks/layerwise_results.py "$RUNS" > "$OUT/results.json"; tail -c 3000 "$OUT/results.json"
cat "$OUT/steps.txt"
