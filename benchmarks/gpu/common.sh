# Sourced by the device scripts in this folder, after they set REPO (the repository root) and
# OUT: the packages benchmarks/gpu/pack.sh packed, unpacked and compiled; the environment every
# run there shares; `step`, which runs a command against the script's time budget; `archive`.
# SKIP_SITE=1 (a dry run here) uses SITE, if set, as the unpacked site instead.
set -u
PY=${PY:-python3}
mkdir -p "$OUT"
if [ -z "${SKIP_SITE:-}" ]; then
  mkdir -p /tmp/site && tar xJf "$REPO/.gpu/site.tar.xz" -C /tmp/site \
    || { echo "no .gpu/site.tar.xz: run benchmarks/gpu/pack.sh here first"; exit 3; }
  SITE=/tmp/site
else
  SITE=${SITE:-}
fi
export PYTHONPATH=${SITE:+$SITE:}$REPO${PYTHONPATH:+:$PYTHONPATH}
# every module compiled to bytecode first, as pip does on install: the packed site has none, and
# each process would otherwise compile Keras from source at every start (benchmarks/README.md)
timeout 120 "$PY" -m compileall -q -j 0 ${SITE:+"$SITE"} "$REPO/tilescan" > /dev/null 2>&1
export KERAS_BACKEND=${KERAS_BACKEND:-jax} TILESCAN_DATA=${TILESCAN_DATA:-$REPO/.gpu/data} PYTHONUNBUFFERED=1
export TILESCAN_COMPILE_CACHE=${TILESCAN_COMPILE_CACHE:-/tmp/tilescan-compile-cache}
# pyogrio (33 MB) is not carried: the runs write every output but the GeoPackage copy
export TILESCAN_OUTPUT__GPKG=false
# the batch and the mosaic's size every script measures at; `tilescan run` processes (bench.py's
# end-to-end runs too) take the batch from the environment
BATCH=${BATCH:-256} SIZE=${SIZE:-10240}
export TILESCAN_INFERENCE__BATCH_SIZE=$BATCH PY SIZE OUT

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

archive() {  # name, kept...: everything in $OUT into $OUT/name.tgz, then only it and the files named
  local name=$1 f keep
  shift
  tar czf "/tmp/$name.tgz" -C "$OUT" . && mv "/tmp/$name.tgz" "$OUT/$name.tgz" || return
  for f in "$OUT"/*; do  # a device call brings back at most 8 files
    keep=0
    for k in "$name.tgz" "$@"; do [[ $(basename "$f") == $k ]] && keep=1; done
    [ "$keep" = 1 ] || rm -f "$f"
  done
  ls -la "$OUT"
}

mosaic_copies() {  # folder: 4 hard links to the $SIZE px mosaic there (built once in /tmp/tilescan-scenes)
  "$PY" -c "import sys, os; from pathlib import Path; sys.path.insert(0, 'benchmarks'); from bench import scene_for
p = scene_for(Path('/tmp/tilescan-scenes'), int(sys.argv[2])); os.makedirs(sys.argv[1], exist_ok=True)
[os.path.exists(f'{sys.argv[1]}/m{k}.tif') or os.link(p, f'{sys.argv[1]}/m{k}.tif') for k in range(4)]" "$1" "$SIZE"
}

multi() {  # name, VAR=VALUE...: `tilescan run` over the 4 copies in /tmp/multi with those settings;
  # its report.json, with the first unit's runtime (what the run used), as $OUT/e2e-multi-name.json
  local name=$1
  shift
  rm -rf "/tmp/multi-$name"
  env "$@" "$PY" -m tilescan.cli -q run /tmp/multi --bands 3,2,1 --no-progress -o "/tmp/multi-$name" && \
    "$PY" -c "import json, sys; r = json.load(open(sys.argv[1] + '/report.json'))
r['runtime_m0'] = json.load(open(sys.argv[1] + '/m0/run.json'))['runtime']
json.dump(r, open(sys.argv[2], 'w'), indent=1)" "/tmp/multi-$name" "$OUT/e2e-multi-$name.json"
}
export -f mosaic_copies multi
