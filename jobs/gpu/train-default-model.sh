#!/usr/bin/env bash
# Train the default model on one GPU with the JAX backend (how tilescan/models/default.keras
# was made). Usage: jobs/gpu/train-default-model.sh AID_DIR OUT_DIR [MAX_SECONDS]
# AID_DIR holds images/, classes.txt and splits/{train,val}.txt (no test list is needed).
set -euo pipefail
aid=$1; out=$2; max=${3:-380}
mkdir -p "$out"
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")/../.." && pwd)
python3 - "$aid" "$out" "$max" "$here/configs/aid-resnet18.toml" <<'PY'
import sys, time
from pathlib import Path
from tilescan.config import load_config
from tilescan.training.data import load_dataset
from tilescan.training.train import train
aid, out, max_s, cfg_path = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
cfg = load_config(cfg_path, environ={}).train
ds = load_dataset(aid)
ds.name = "AID"
t = time.time()
r = train(ds, out / "aid-resnet18.keras", cfg, overwrite=True, max_seconds=max_s, half=True, verbose=0)
print("train summary:", {k: r[k] for k in ("val_accuracy", "best_epoch", "epochs_done", "stopped")}, f"{time.time()-t:.0f} s")
PY
