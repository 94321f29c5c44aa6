#!/bin/bash
# Where the GPU machine's time goes, in one device call after check.sh (same .gpu/ carry; py-spy
# as .gpu/py-spy.xz when there): start-up phase by phase with the compilation cache empty, then
# warm (startup.py); the host side's no-op run on 1, 2, 4, 8 and all cores, and on all cores
# over 4 copies of the mosaic; the real model end to end over 4 copies of the 10,240 px mosaic
# (batches span scenes) with the default readers and with 8; and, with py-spy, where the
# threads of a no-op all-core run hold the GIL. JSONs and one archive with every log in $OUT.
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
OUT=${OUT:-/tmp/tilescan-gpu-diag}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -z "${SKIP_SITE:-}" ]; then
  mkdir -p /tmp/site && tar xJf .gpu/site.tar.xz -C /tmp/site || { echo "no .gpu/site.tar.xz"; exit 3; }
  export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
# every module compiled to bytecode first, as pip does on install: the packed site has none, and
# each process would otherwise compile Keras from source at every start (benchmarks/README.md)
timeout 120 "$PY" -m compileall -q -j 0 ${PYTHONPATH:+${PYTHONPATH%%:*}} "$REPO/tilescan" > /dev/null 2>&1
export KERAS_BACKEND=${KERAS_BACKEND:-jax} TILESCAN_DATA=${TILESCAN_DATA:-$REPO/.gpu/data} PYTHONUNBUFFERED=1
export TILESCAN_COMPILE_CACHE=${TILESCAN_COMPILE_CACHE:-/tmp/tilescan-compile-cache} TILESCAN_OUTPUT__GPKG=false
BATCH=${BATCH:-256} SIZE=${SIZE:-10240}
export TILESCAN_INFERENCE__BATCH_SIZE=$BATCH
DEADLINE=$(( $(date +%s) + ${BUDGET:-300} ))
step() {  # name, seconds, command...: as in check.sh
  local name=$1 limit=$2 t0 rc left
  shift 2
  left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 15 ]; then echo "$name skipped: ${left} s left" | tee -a "$OUT/steps.txt"; return; fi
  [ "$left" -lt "$limit" ] && limit=$left
  t0=$(date +%s.%N)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(python3 -c "print(round($(date +%s.%N) - $t0, 2))") s" | tee -a "$OUT/steps.txt"
  tail -n 3 "$OUT/$name.log"
}
multi() {  # readers, name: `tilescan run` over 4 copies of the mosaic at $BATCH, its report.json kept
  rm -rf "/tmp/multi-$2"
  TILESCAN_INFERENCE__READER_THREADS=$1 "$PY" -m tilescan.cli -q run /tmp/multi --bands 3,2,1 --no-progress \
    -o "/tmp/multi-$2" && cp "/tmp/multi-$2/report.json" "$OUT/e2e-multi-$2.json"
}
export -f multi
export PY OUT

rm -rf "$TILESCAN_COMPILE_CACHE"
step startup-cold 60 "$PY" benchmarks/startup.py --batch "$BATCH" --out "$OUT/startup-cold.json"
step startup-warm 60 "$PY" benchmarks/startup.py --batch "$BATCH" --out "$OUT/startup-warm.json"
step host-scaling 90 "$PY" benchmarks/pipeline.py host --readers default --cores "${CORES:-1,2,4,8,all}" --rounds 1 --no-gpkg \
  --work /tmp/tilescan-host --out "$OUT/host-scaling.json"
step host-copies 45 "$PY" benchmarks/pipeline.py host --readers default --cores all --copies 4 --rounds 1 --no-gpkg \
  --work /tmp/tilescan-host --out "$OUT/host-copies.json"
step mosaic 60 "$PY" -c "import sys, os; from pathlib import Path; sys.path.insert(0, 'benchmarks'); from bench import scene_for
p = scene_for(Path('/tmp/tilescan-scenes'), $SIZE); os.makedirs('/tmp/multi', exist_ok=True)
[os.path.exists(f'/tmp/multi/m{k}.tif') or os.link(p, f'/tmp/multi/m{k}.tif') for k in range(4)]"
step e2e-multi-auto 60 bash -c "multi auto auto"
step e2e-multi-8 60 bash -c "multi 8 r8"
if [ -f .gpu/py-spy.xz ]; then
  xz -dc .gpu/py-spy.xz > /tmp/py-spy && chmod +x /tmp/py-spy
  step spy-gil 60 /tmp/py-spy record --format raw --gil --threads --subprocesses -r 200 -o "$OUT/spy-gil.txt" -- \
    "$PY" benchmarks/pipeline.py host --readers default --cores all --copies 2 --rounds 1 --no-gpkg --work /tmp/tilescan-host
fi
tar czf /tmp/diag-all.tgz -C "$OUT" . && mv /tmp/diag-all.tgz "$OUT/diag-all.tgz" && rm -f "$OUT"/*.log "$OUT"/*.txt
ls -la "$OUT"
