#!/usr/bin/env bash
# Run tilescan from cron without ever running two copies on the same output folder.
#
#   jobs/cron/tilescan-cron.sh OUT INPUT... [tilescan run options]
#
# Takes an exclusive, non-blocking flock on OUT/.tilescan-cron.lock, then runs
#   tilescan run --no-progress -o OUT INPUT... [options]   and   tilescan collect OUT
# If an earlier run still holds the lock (a slow night), it prints who holds it and exits
# with code 75 (EX_TEMPFAIL) at once, doing nothing. The lock belongs to the open file, so
# it is released when the run ends however it ends (even SIGKILL); there is no stale lock
# file to clean up. Finished scenes are skipped, so each cron run only does new work.
#
# Exit codes: tilescan run's (0 ok, 3 some scenes failed, ...; see `tilescan --help`),
# 75 another run holds the lock, 2 usage or no tilescan command. cron's PATH is minimal: set TILESCAN to the
# tilescan executable (e.g. /opt/tilescan/.venv/bin/tilescan), or put it on PATH in the
# crontab. TILESCAN_COLLECT=0 skips the collect step (skipped too after a stop by a signal).
set -uo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 OUT INPUT... [tilescan run options]" >&2
  exit 2
fi
OUT=$1
shift
TILESCAN=${TILESCAN:-tilescan}
LOCK="$OUT/.tilescan-cron.lock"
stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }

mkdir -p "$OUT" || exit 6
exec 9>>"$LOCK" || { echo "tilescan-cron: cannot open the lock file $LOCK" >&2; exit 6; }
if ! flock --nonblock 9; then
  holder=$(cat "$LOCK" 2>/dev/null || true)
  echo "tilescan-cron: $(stamp): another tilescan-cron run holds $LOCK (${holder:-it has just started});" \
       "not starting a second one on $OUT" >&2
  exit 75
fi
# Note who holds it, for the message above (the lock is the flock on the open file; its
# content is only informative).
truncate -s 0 "$LOCK" && echo "pid $$ on $(hostname) since $(stamp); the lock is the open file: do not delete it" >&9

if ! command -v "$TILESCAN" >/dev/null 2>&1; then
  echo "tilescan-cron: no tilescan command '$TILESCAN' (PATH=$PATH): set TILESCAN to the tilescan" \
       "executable, e.g. TILESCAN=/opt/tilescan/.venv/bin/tilescan in the crontab" >&2
  exit 2
fi
echo "tilescan-cron: $(stamp): start on $OUT"
# SIGTERM/SIGINT to this script (a shutdown, `kill <pid>`) are passed on to tilescan, which
# stops between batches, keeps finished scenes and exits 75; the next cron run resumes.
"$TILESCAN" run --no-progress -o "$OUT" "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM
trap 'kill -INT "$pid" 2>/dev/null' INT
wait "$pid"
rc=$?
while [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; do  # wait was cut short by a signal we passed on
  wait "$pid"
  rc=$?
done
trap - TERM INT
if [ "${TILESCAN_COLLECT:-1}" != 0 ] && [ "$rc" -ne 75 ] && [ -d "$OUT" ]; then
  "$TILESCAN" collect "$OUT" || { c=$?; [ $rc -eq 0 ] && rc=$c; }
fi
echo "tilescan-cron: $(stamp): finished with exit code $rc"
exit $rc
