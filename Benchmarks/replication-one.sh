#!/usr/bin/env bash
# Benchmarks/replication-one.sh -- one fio job against one replicated volume, with the CPU each
# site spent per write: the harness behind the "where the time goes" figures in BENCHMARKS.md.
#
# Usage: Benchmarks/replication-one.sh MODE JOB [SECONDS] [perf]
#   MODE     plain | sync | semi-sync | async   (the volume's replica on west; plain: none)
#   JOB      a fio job file: a name in ../shared/bench (randwrite-4k-qd32) or a path
#            (Benchmarks/jobs/randwrite-4k-qd32-flush16.fio); its runtime= becomes SECONDS (15)
#   perf     also `perf record -a -g` 8 s of the run into ./perf.data (from second 4)
#   trace    instead: every system call of the machine for 0.2 s into ./trace.txt (`perf trace`)
#   sched    instead: the scheduler's events for 1 s into ./sched.data (`perf sched timehist -i
#            sched.data -s` for each thread's runs, waits and scheduling delays)
#   FERRY_BIN=path  the ferry binary (default: the release build in .build-release, built first)
#   MAXLAG=1G       async's max-lag
#   ONLAG=throttle  async's on-lag (throttle | pull-ahead)
#
# Two sites on 127.0.0.1 in a temp dir (removed at the end), one 1 GiB volume `v`, primary east.
# Waits until the replica is in sync, runs fio through NBD on east, prints IOPS, bandwidth, mean
# latency and the CPU of each `ferry serve` (percent of one core, from /proc/PID/stat), then
# waits until nothing is lagging or in flight (the drain time) and compares the two images.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
SHARED="${FERRY_SHARED:-$ROOT/../shared}"
die() { echo "replication-one.sh: $*" >&2; exit 2; }
# shellcheck source=lib.sh
. "$HERE/lib.sh"
[ $# -ge 2 ] || die "usage: $0 MODE JOB [SECONDS] [perf] (try -h)"
[ "$1" = -h ] && { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0; }
MODE=$1 JOB=$2 SECS=${3:-15} EXTRA=${4:-}
case $JOB in */*) JF=$JOB ;; *) JF=$SHARED/bench/$JOB.fio ;; esac
[ -f "$JF" ] || die "no job file $JF"
case $MODE in
    plain) REPLICAS="" ;;
    sync|semi-sync) REPLICAS="    replicas:
      west: { mode: $MODE }" ;;
    async) REPLICAS="    replicas:
      west: { mode: async, max-lag: ${MAXLAG:-1G}, on-lag: ${ONLAG:-throttle} }" ;;
    *) die "unknown mode '$MODE' (plain, sync, semi-sync, async)" ;;
esac
cd "$ROOT"
ferry_binary

WORK=$(mktemp -d /tmp/ferry-one-XXXXXX)
EAST_PID="" WEST_PID="" PERF_PID=""
cleanup() { stop "$PERF_PID"; stop "$EAST_PID"; stop "$WEST_PID"; rm -rf "$WORK"; }
trap cleanup EXIT
EAST_REPL=$(port); EAST_NBD=$(port); WEST_REPL=$(port); WEST_NBD=$(port)
for s in east west; do "$FERRY_BIN" init --site "$s" --data "$WORK/$s" >/dev/null; done
EAST_ID=$("$FERRY_BIN" id --data "$WORK/east" | cut -d' ' -f1)
WEST_ID=$("$FERRY_BIN" id --data "$WORK/west" | cut -d' ' -f1)
VOLUMES="volumes:
  v:
    size: 1G
    primary: east
$REPLICAS"
site_config "$WORK" east "$EAST_REPL" "$EAST_NBD" west "$WEST_REPL" "$WEST_ID" "$VOLUMES"
site_config "$WORK" west "$WEST_REPL" "$WEST_NBD" east "$EAST_REPL" "$EAST_ID" "$VOLUMES"
"$FERRY_BIN" serve --config "$WORK/west.yaml" >>"$WORK/west.log" 2>&1 & WEST_PID=$!
"$FERRY_BIN" serve --config "$WORK/east.yaml" >>"$WORK/east.log" 2>&1 & EAST_PID=$!
for _ in $(seq 300); do "$FERRY_BIN" status --config "$WORK/east.yaml" >/dev/null 2>&1 && break; sleep 0.1; done
ADMIN="socket:$WORK/east/admin.sock"
python3 "$HERE/replication-watch.py" wait --config "$ADMIN" --timeout 600 >/dev/null \
    || { tail -n 20 "$WORK/east.log" "$WORK/west.log" >&2; die "the replica did not get in sync"; }

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
sed -e "s/^runtime=.*/runtime=${SECS}s/" "$JF" > "$WORK/job.fio"
E0=$(cpu "$EAST_PID"); W0=$(cpu "$WEST_PID"); T0=$(date +%s.%N)
if [ "$EXTRA" = perf ]; then
    (sleep 4; exec perf record -a -F 2999 -g -o "$PWD/perf.data" -- sleep 8) >/dev/null 2>&1 & PERF_PID=$!
elif [ "$EXTRA" = trace ]; then
    (sleep 4; exec perf trace -a -T -o "$PWD/trace.txt" -- sleep 0.2) >/dev/null 2>&1 & PERF_PID=$!
elif [ "$EXTRA" = sched ]; then
    (sleep 4; exec perf sched record -o "$PWD/sched.data" -- sleep 1) >/dev/null 2>&1 & PERF_PID=$!
fi
NBD_URI="nbd://127.0.0.1:$EAST_NBD/v" fio "$WORK/job.fio" --output-format=json --output="$WORK/fio.json" >/dev/null 2>&1 \
    || { cat "$WORK/fio.json" >&2; die "fio failed"; }
T1=$(date +%s.%N); E1=$(cpu "$EAST_PID"); W1=$(cpu "$WEST_PID")
[ -n "$PERF_PID" ] && { wait "$PERF_PID" || true; PERF_PID=""; }
python3 - "$WORK/fio.json" "$E0" "$E1" "$W0" "$W1" "$T0" "$T1" "$MODE" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
w = job["write"]
e0, e1, w0, w1 = map(int, sys.argv[2:6]); t0, t1 = map(float, sys.argv[6:8])
el = t1 - t0
print(f"{sys.argv[8]}: {w['iops']:.0f} IOPS, {w['bw'] / 1024:.0f} MiB/s, mean latency {w['lat_ns']['mean'] / 1000:.0f} us; "
      f"CPU east {(e1 - e0) / el:.0f}%, west {(w1 - w0) / el:.0f}% of a core "
      f"({(e1 - e0) * 1e4 / max(1, w['total_ios']):.0f} / {(w1 - w0) * 1e4 / max(1, w['total_ios']):.0f} us per write, ramp included)")
f = job.get("sync", {})
if f.get("total_ios", 0) > 0:
    print(f"flushes: {f['total_ios'] / max(1e-9, job['job_runtime'] / 1000):.0f}/s, mean latency {f['lat_ns']['mean'] / 1000:.0f} us")
PY
echo "east pid $EAST_PID, west pid $WEST_PID"
D0=$(date +%s.%N)
python3 "$HERE/replication-watch.py" wait --drained --config "$ADMIN" --timeout 600 >/dev/null || echo "not drained after 600 s"
echo "drained in $(python3 -c "import time; print(round(time.time() - $D0, 2))") s"
if [ "$MODE" != plain ]; then
    cmp -s "$WORK/east/volumes/v.img" "$WORK/west/volumes/v.img" && echo "replica identical" || { echo "replica DIFFERS"; exit 1; }
fi
