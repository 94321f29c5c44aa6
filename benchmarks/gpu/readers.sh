#!/bin/bash
# Reader threads against reader processes ([inference] reader_processes), and the GIL's switch
# interval the run keeps on a GPU ([inference] switch_interval_ms: auto = 0.5 ms) against
# Python's 5 ms, on the GPU machine in one device call (the .gpu/ carry of check.sh, packed with
# N_AID=0 SPY=1: no AID images are needed here, and py-spy as .gpu/py-spy.xz), the most telling
# first (the budget cuts the last): the real model end to end on the 10,240 px mosaic (bench.py
# e2e) with threads, processes, and threads at 5 ms; `tilescan run` over 4 copies of that mosaic
# (batches span scenes) with threads and processes; the 40 chips of 512 px with the real model
# (`pipeline.py small`: chips a second on the GPU host), and 320 chips in one `tilescan run`
# process against four sharing the GPU (`chips_procs.py`); the 4 copies with threads and
# processes at 5 ms; the host side's no-op run of the 12k mosaic on 1 and all cores, threads and
# processes alternated (2 rounds; its `tail_s`: each of the scene's end steps after the last
# batch, with cores free), and on all cores with threads at 5 ms, at the run's batch; and, with
# py-spy, the held GIL of a no-op all-core run with reader processes. JSONs and one archive with
# every log in $OUT.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
OUT=${OUT:-/tmp/tilescan-gpu-readers}
BUDGET=${BUDGET:-560}
. benchmarks/gpu/common.sh
step info 40 "$PY" -m tilescan.cli info --runtime
e2e() {  # name, VAR=VALUE...: bench.py's model-only, model + Grad-CAM and end-to-end runs with those settings
  local name=$1
  shift
  step "e2e-$name" 90 env "$@" "$PY" benchmarks/bench.py --only model,gradcam,e2e --size "$SIZE" --rounds 2 \
    --set "inference.batch_size=$BATCH" --scenes /tmp/tilescan-scenes --out "$OUT/e2e-$name.json"
}
e2e procs-false TILESCAN_INFERENCE__READER_PROCESSES=false
e2e procs-true TILESCAN_INFERENCE__READER_PROCESSES=true
e2e procs-false-switch5 TILESCAN_INFERENCE__READER_PROCESSES=false TILESCAN_INFERENCE__SWITCH_INTERVAL_MS=5
step mosaic 60 bash -c "mosaic_copies /tmp/multi"
step e2e-multi-threads 60 bash -c "multi threads TILESCAN_INFERENCE__READER_PROCESSES=false"
step e2e-multi-procs 60 bash -c "multi procs TILESCAN_INFERENCE__READER_PROCESSES=true"
step small 45 "$PY" benchmarks/pipeline.py small --rounds 3 --no-gpkg --work /tmp/tilescan-small --out "$OUT/small.json"
step chips-procs 75 "$PY" benchmarks/chips_procs.py --chips 320 --procs 1,4 --work /tmp/tilescan-chips \
  --out "$OUT/chips-procs.json"
step e2e-multi-threads-switch5 60 bash -c \
  "multi threads-switch5 TILESCAN_INFERENCE__READER_PROCESSES=false TILESCAN_INFERENCE__SWITCH_INTERVAL_MS=5"
step e2e-multi-procs-switch5 60 bash -c \
  "multi procs-switch5 TILESCAN_INFERENCE__READER_PROCESSES=true TILESCAN_INFERENCE__SWITCH_INTERVAL_MS=5"
step host-readers 120 "$PY" benchmarks/pipeline.py host --readers default --cores "${CORES:-1,all}" --rounds 2 \
  --no-gpkg --reader-processes both --batch "$BATCH" --work /tmp/tilescan-host --out "$OUT/host-readers.json"
step host-threads-switch5 60 "$PY" benchmarks/pipeline.py host --readers default --cores all --rounds 1 --no-gpkg \
  --switch-ms 5 --batch "$BATCH" --work /tmp/tilescan-host --out "$OUT/host-threads-switch5.json"
if [ -s .gpu/py-spy.xz ]; then
  xz -dc .gpu/py-spy.xz > /tmp/py-spy && chmod +x /tmp/py-spy
  step spy-gil-procs 60 /tmp/py-spy record --format raw --gil --threads --subprocesses -r 200 -o "$OUT/spy-gil-procs.txt" -- \
    "$PY" benchmarks/pipeline.py host --readers default --cores all --copies 2 --rounds 1 --no-gpkg --reader-processes on \
    --batch "$BATCH" --work /tmp/tilescan-host
  step gil-procs 30 "$PY" benchmarks/gil_profile.py "$OUT/spy-gil-procs.txt" --tiles 16704 --out "$OUT/gil-procs.json"
fi
archive readers-all 'e2e-procs-*.json' 'e2e-multi-*.json'  # 7 + the archive: a call brings back 8 files
