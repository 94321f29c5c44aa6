#!/bin/bash
# Reader threads against reader processes ([inference] reader_processes) on the GPU machine, in
# one device call (same .gpu/ carry as check.sh; py-spy as .gpu/py-spy.xz when there): the host
# side's no-op run of the 12k mosaic on 1, 4 and all cores, each way, alternated (2 rounds); the real model
# end to end on the 10,240 px mosaic (bench.py e2e), each way; `tilescan run` over 4 copies of
# that mosaic (batches span scenes), each way; and, with py-spy, the held GIL of a no-op
# all-core run with reader processes. JSONs and one archive with every log in $OUT.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
OUT=${OUT:-/tmp/tilescan-gpu-readers}
BUDGET=${BUDGET:-540}
. benchmarks/gpu/common.sh
step info 60 "$PY" -m tilescan.cli info --runtime
step host-readers 150 "$PY" benchmarks/pipeline.py host --readers default --cores "${CORES:-1,4,all}" --rounds 2 \
  --no-gpkg --reader-processes both --work /tmp/tilescan-host --out "$OUT/host-readers.json"
for m in false true; do
  step "e2e-procs-$m" 90 env TILESCAN_INFERENCE__READER_PROCESSES=$m "$PY" benchmarks/bench.py --only model,gradcam,e2e \
    --size "$SIZE" --rounds 2 --set "inference.batch_size=$BATCH" --scenes /tmp/tilescan-scenes --out "$OUT/e2e-procs-$m.json"
done
step mosaic 60 bash -c "mosaic_copies /tmp/multi"
step e2e-multi-threads 60 bash -c "multi threads TILESCAN_INFERENCE__READER_PROCESSES=false"
step e2e-multi-procs 60 bash -c "multi procs TILESCAN_INFERENCE__READER_PROCESSES=true"
if [ -f .gpu/py-spy.xz ]; then
  xz -dc .gpu/py-spy.xz > /tmp/py-spy && chmod +x /tmp/py-spy
  step spy-gil-procs 60 /tmp/py-spy record --format raw --gil --threads --subprocesses -r 200 -o "$OUT/spy-gil-procs.txt" -- \
    "$PY" benchmarks/pipeline.py host --readers default --cores all --copies 2 --rounds 1 --no-gpkg --reader-processes on \
    --work /tmp/tilescan-host
  step gil-procs 30 "$PY" benchmarks/gil_profile.py "$OUT/spy-gil-procs.txt" --tiles 16704 --out "$OUT/gil-procs.json"
fi
archive readers-all '*.json'
