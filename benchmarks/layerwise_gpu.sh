#!/usr/bin/env bash
# Layer-streamed calibration on one GPU (issue 16; figures in benchmarks/NOTES.md), in two device calls:
#   run: PART=A bash benchmarks/layerwise_gpu.sh   GPU tests; resident vs streamed on 4 layers; 3 layers from the disk
#   run: PART=B bash benchmarks/layerwise_gpu.sh   61 layers top-k; 4 layers' peak memory; all-experts on 6 layers
#   run: PART=C bash benchmarks/layerwise_gpu.sh   the GPU test; 3 layers from the disk and drawn; top-k on 20 layers
#   run: PART=D bash benchmarks/layerwise_gpu.sh   3 layers from the disk (reused pinned buffers); batch size and
#                                                  hidden states on the host, top-k on 20 layers; all-experts on 6
#   run: PART=E bash benchmarks/layerwise_gpu.sh   4 layers from the disk; 61 layers top-k and 6 all-experts, at
#                                                  16 sequences a batch with the hidden states on the host
# (carry .whl: modelopt, hydra, omegaconf... as py3.12 wheels). Results: $OUT/steps.txt, $OUT/results.json.
set -u
OUT=${OUT:-layerwise_gpu} RUNS=${RUNS:-/tmp/layerwise_runs}
. benchmarks/device_lib.sh
SLICE="model=ds_v3_slice data.seq_len=512 data.batch_size=8"
if [ "${PART:-A}" = A ]; then
  step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_layerwise.py \
    -k "gpu or reused or nvfp4-topk or fp8-all_experts-plain"
  run slice4_resident_topk 120 $SLICE data.num_samples=64 calib=topk
  run slice4_streamed_topk 120 $SLICE data.num_samples=64 calib=topk calib.layerwise=true
  run slice4_streamed_topk_host 120 $SLICE data.num_samples=64 calib=topk calib.layerwise=true calib.hidden_on_host=true
  step write_slice 100 python3 -m deepseek_ptq.devtools.slice_checkpoint --out /tmp/slice3 --layers 3 --dense 1
  cp "$RUNS/write_slice.log" "$RUNS/write_slice.json"
  THREE="$SLICE model.n_layers=3 model.n_dense_layers=1 data.num_samples=256 calib=topk calib.layerwise=true"
  run disk3_topk 120 $THREE model.random_weights=false model.ckpt_dir=/tmp/slice3 calib.resume_every=0
  run drawn3_topk 120 $THREE calib.resume_every=0
elif [ "$PART" = C ]; then
  step gpu_test 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_layerwise.py
  step write_slice 100 python3 -m deepseek_ptq.devtools.slice_checkpoint --out /tmp/slice3 --layers 3 --dense 1
  cp "$RUNS/write_slice.log" "$RUNS/write_slice.json"
  THREE="$SLICE model.n_layers=3 model.n_dense_layers=1 data.num_samples=1024 calib=topk calib.layerwise=true"
  run disk3_topk 100 $THREE model.random_weights=false model.ckpt_dir=/tmp/slice3 calib.resume_every=0
  cp "$RUNS/disk3_topk/stats/layers.csv" "$OUT/disk3_topk_layers.csv"
  run drawn3_topk 100 $THREE calib.resume_every=0
  run l20_topk 150 $SLICE model.n_layers=20 model.n_dense_layers=3 data.num_samples=1024 calib=topk \
    calib.layerwise=true calib.resume_every=0
  cp "$RUNS/l20_topk/stats/layers.csv" "$OUT/l20_topk_layers.csv"
elif [ "$PART" = D ]; then
  step write_slice 100 python3 -m deepseek_ptq.devtools.slice_checkpoint --out /tmp/slice3 --layers 3 --dense 1
  cp "$RUNS/write_slice.log" "$RUNS/write_slice.json"
  THREE="$SLICE model.n_layers=3 model.n_dense_layers=1 data.num_samples=1024 calib=topk calib.layerwise=true"
  run disk3_topk 100 $THREE model.random_weights=false model.ckpt_dir=/tmp/slice3 calib.resume_every=0
  cp "$RUNS/disk3_topk/stats/layers.csv" "$OUT/disk3_topk_layers.csv"
  run drawn3_topk 60 $THREE calib.resume_every=0
  L20="model=ds_v3_slice data.seq_len=512 model.n_layers=20 model.n_dense_layers=3 data.num_samples=1024 calib=topk
    calib.layerwise=true calib.resume_every=0 calib.hidden_on_host=true"
  run l20_topk_b16_host 110 $L20 data.batch_size=16
  cp "$RUNS/l20_topk_b16_host/stats/layers.csv" "$OUT/l20_topk_b16_host_layers.csv"
  run l20_topk_b32_host 110 $L20 data.batch_size=32
  cp "$RUNS/l20_topk_b32_host/stats/layers.csv" "$OUT/l20_topk_b32_host_layers.csv"
  run l6_all_experts_b16_host 110 model=ds_v3_slice data.seq_len=512 data.batch_size=16 model.n_layers=6 \
    model.n_dense_layers=3 data.num_samples=1024 calib=all_experts calib.layerwise=true calib.resume_every=0 \
    calib.hidden_on_host=true
  cp "$RUNS/l6_all_experts_b16_host/stats/layers.csv" "$OUT/l6_all_experts_b16_host_layers.csv"
elif [ "$PART" = E ]; then
  B16="model=ds_v3_slice data.seq_len=512 data.batch_size=16 data.num_samples=1024 calib.layerwise=true
    calib.resume_every=0 calib.hidden_on_host=true"
  step span_reader_tests 60 python3 -m pytest -q -p no:cacheprovider tests/test_span_reader.py
  grep -q "4 passed" "$RUNS/span_reader_tests.log" || exit 1
  step write_slice 120 python3 -m deepseek_ptq.devtools.slice_checkpoint --out /tmp/slice4 --layers 4 --dense 1
  cp "$RUNS/write_slice.log" "$RUNS/write_slice.json"
  run disk4_topk_b16_host 110 $B16 model.n_layers=4 model.n_dense_layers=1 calib=topk model.random_weights=false \
    model.ckpt_dir=/tmp/slice4
  cp "$RUNS/disk4_topk_b16_host/stats/layers.csv" "$OUT/disk4_topk_b16_host_layers.csv"
  rm -rf /tmp/slice4
  run full61_topk_b16_host 270 $B16 model.n_layers=61 model.n_dense_layers=3 calib=topk
  cp "$RUNS/full61_topk_b16_host/stats/layers.csv" "$OUT/full61_topk_b16_host_layers.csv"
  run l6_all_experts_b16_host 110 $B16 model.n_layers=6 model.n_dense_layers=3 calib=all_experts
  cp "$RUNS/l6_all_experts_b16_host/stats/layers.csv" "$OUT/l6_all_experts_b16_host_layers.csv"
else
  run full61_topk 330 $SLICE model.n_layers=61 model.n_dense_layers=3 data.num_samples=1024 calib=topk \
    calib.layerwise=true calib.resume_every=0
  cp "$RUNS/full61_topk/stats/layers.csv" "$OUT/full61_topk_layers.csv"
  run slice4_streamed_topk 120 $SLICE data.num_samples=64 calib=topk calib.layerwise=true
  run l6_all_experts 120 $SLICE model.n_layers=6 model.n_dense_layers=3 data.num_samples=1024 calib=all_experts \
    calib.layerwise=true calib.resume_every=0
  cp "$RUNS/l6_all_experts/stats/layers.csv" "$OUT/l6_all_experts_layers.csv"
fi
python3 benchmarks/layerwise_results.py "$RUNS" > "$OUT/results.json"; tail -c 3000 "$OUT/results.json"
