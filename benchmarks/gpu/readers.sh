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
BATCH=${BATCH:-256} SIZE=${SIZE:-10240}
export TILESCAN_INFERENCE__BATCH_SIZE=$BATCH
multi() {  # name, reader_processes: `tilescan run` over 4 copies of the mosaic at $BATCH, report.json kept
  # with the first unit's runtime (whether reader processes were used)
  rm -rf "/tmp/multi-$1"
  TILESCAN_INFERENCE__READER_PROCESSES=$2 "$PY" -m tilescan.cli -q run /tmp/multi --bands 3,2,1 --no-progress \
    -o "/tmp/multi-$1" && "$PY" -c "import json, sys; r = json.load(open(sys.argv[1] + '/report.json'))
r['runtime_m0'] = json.load(open(sys.argv[1] + '/m0/run.json'))['runtime']  # what the run used
json.dump(r, open(sys.argv[2], 'w'), indent=1)" "/tmp/multi-$1" "$OUT/e2e-multi-$1.json"
}
export -f multi
export PY OUT

step info 60 "$PY" -m tilescan.cli info --runtime
step host-readers 150 "$PY" benchmarks/pipeline.py host --readers default --cores "${CORES:-1,4,all}" --rounds 2 \
  --no-gpkg --reader-processes both --work /tmp/tilescan-host --out "$OUT/host-readers.json"
for m in false true; do
  step "e2e-procs-$m" 90 env TILESCAN_INFERENCE__READER_PROCESSES=$m "$PY" benchmarks/bench.py --only model,gradcam,e2e \
    --size "$SIZE" --rounds 2 --set "inference.batch_size=$BATCH" --scenes /tmp/tilescan-scenes --out "$OUT/e2e-procs-$m.json"
done
step mosaic 60 "$PY" -c "import sys, os; from pathlib import Path; sys.path.insert(0, 'benchmarks'); from bench import scene_for
p = scene_for(Path('/tmp/tilescan-scenes'), $SIZE); os.makedirs('/tmp/multi', exist_ok=True)
[os.path.exists(f'/tmp/multi/m{k}.tif') or os.link(p, f'/tmp/multi/m{k}.tif') for k in range(4)]"
step e2e-multi-threads 60 bash -c "multi threads false"
step e2e-multi-procs 60 bash -c "multi procs true"
if [ -f .gpu/py-spy.xz ]; then
  xz -dc .gpu/py-spy.xz > /tmp/py-spy && chmod +x /tmp/py-spy
  step spy-gil-procs 60 /tmp/py-spy record --format raw --gil --threads --subprocesses -r 200 -o "$OUT/spy-gil-procs.txt" -- \
    "$PY" benchmarks/pipeline.py host --readers default --cores all --copies 2 --rounds 1 --no-gpkg --reader-processes on \
    --work /tmp/tilescan-host
  step gil-procs 30 "$PY" benchmarks/gil_profile.py "$OUT/spy-gil-procs.txt" --tiles 16704 --out "$OUT/gil-procs.json"
fi
archive readers-all '*.json'
