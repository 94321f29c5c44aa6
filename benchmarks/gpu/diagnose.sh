#!/bin/bash
# Where the GPU machine's time goes, in one device call after check.sh (same .gpu/ carry; py-spy
# as .gpu/py-spy.xz when there): start-up phase by phase with the compilation cache empty, then
# warm (startup.py); the host side's no-op run on 1, 2, 4, 8 and all cores, and on all cores
# over 4 copies of the mosaic; the real model end to end over 4 copies of the 10,240 px mosaic
# (batches span scenes) with the default readers and with 8; and, with py-spy, where the
# threads of a no-op all-core run hold the GIL. JSONs and one archive with every log in $OUT.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
OUT=${OUT:-/tmp/tilescan-gpu-diag}
BUDGET=${BUDGET:-300}
. benchmarks/gpu/common.sh

rm -rf "$TILESCAN_COMPILE_CACHE"
step startup-cold 60 "$PY" benchmarks/startup.py --batch "$BATCH" --out "$OUT/startup-cold.json"
step startup-warm 60 "$PY" benchmarks/startup.py --batch "$BATCH" --out "$OUT/startup-warm.json"
step host-scaling 90 "$PY" benchmarks/pipeline.py host --readers default --cores "${CORES:-1,2,4,8,all}" --rounds 1 --no-gpkg \
  --work /tmp/tilescan-host --out "$OUT/host-scaling.json"
step host-copies 45 "$PY" benchmarks/pipeline.py host --readers default --cores all --copies 4 --rounds 1 --no-gpkg \
  --work /tmp/tilescan-host --out "$OUT/host-copies.json"
step mosaic 60 bash -c "mosaic_copies /tmp/multi"
step e2e-multi-auto 60 bash -c "multi auto TILESCAN_INFERENCE__READER_THREADS=auto"
step e2e-multi-r8 60 bash -c "multi r8 TILESCAN_INFERENCE__READER_THREADS=8"
if [ -s .gpu/py-spy.xz ]; then
  xz -dc .gpu/py-spy.xz > /tmp/py-spy && chmod +x /tmp/py-spy
  step spy-gil 60 /tmp/py-spy record --format raw --gil --threads --subprocesses -r 200 -o "$OUT/spy-gil.txt" -- \
    "$PY" benchmarks/pipeline.py host --readers default --cores all --copies 2 --rounds 1 --no-gpkg --work /tmp/tilescan-host
fi
archive diag-all '*.json'
