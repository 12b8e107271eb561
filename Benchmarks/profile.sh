#!/usr/bin/env bash
# Benchmarks/profile.sh -- one replicated volume under one fio job, with the CPU each site spends
# per write, optionally under perf or strace: the harness behind BENCHMARKS.md's "where the time
# goes". Not a benchmark table (use replication.sh for ratios); a tool for finding the cost.
#
# Usage: Benchmarks/profile.sh MODE JOB [SECONDS] [perf|strace|trace] [OUT_DIR]
#   MODE     sync | semi-sync | async | scheduled | none (an unreplicated volume)
#   JOB      a job of ../shared/bench without .fio: randwrite-4k-qd1, randwrite-4k-qd32, seqwrite-1m-qd8
#   SECONDS  fio's runtime (default 15; 2 s of ramp before it)
#   perf     `perf record -g` of each daemon over the run: OUT_DIR/east.data, OUT_DIR/west.data
#   strace   `strace -c` (syscall counts) of each daemon: OUT_DIR/east.strace, OUT_DIR/west.strace
#   trace    `strace -f -ttt` of both daemons for 2 s, 5 s into the run: OUT_DIR/both.trace
#   OUT_DIR  default /tmp/ferry-profile
# Prints fio's IOPS and mean latency, and the CPU time (user + system, from /proc/PID/stat over
# 8 s of steady state from 5 s in) each daemon spent per write. Two sites on 127.0.0.1, a 1 GiB
# volume primary on east; everything it starts is stopped by PID, also on error.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${FERRY_SHARED:-$ROOT/../shared}
# shellcheck source=lib.sh
. "$ROOT/Benchmarks/lib.sh"
MODE=${1:?MODE}; JOB=${2:?JOB}; SECS=${3:-15}; TOOL=${4:-}; OUT=${5:-/tmp/ferry-profile}
[ "$SECS" -ge 12 ] || { echo "SECONDS must be at least 12 (the CPU sample is 8 s from 5 s in)" >&2; exit 2; }
ferry_binary
mkdir -p "$OUT"
W=$(mktemp -d /tmp/ferry-profile-XXXX)
EP=""; WP=""; PP=()
cleanup() { for p in "${PP[@]}"; do kill "$p" 2>/dev/null || true; done; stop "$EP"; stop "$WP"; rm -rf "$W"; }
trap cleanup EXIT
ER=$(port); EN=$(port); WR=$(port); WN=$(port)
for s in east west; do "$FERRY_BIN" init --site $s --data "$W/$s" >/dev/null; done
EID=$("$FERRY_BIN" id --data "$W/east" | cut -d' ' -f1); WID=$("$FERRY_BIN" id --data "$W/west" | cut -d' ' -f1)
case $MODE in
    none) REP="" ;;
    async) REP="    replicas:
      west: { mode: async, max-lag: 1G }" ;;
    scheduled) REP="    replicas:
      west: { mode: scheduled, every: 1h }" ;;
    *) REP="    replicas:
      west: { mode: $MODE }" ;;
esac
VOLUMES="volumes:
  v:
    size: 1G
    primary: east
$REP"
site_config "$W" east "$ER" "$EN" west "$WR" "$WID" "$VOLUMES"; site_config "$W" west "$WR" "$WN" east "$ER" "$EID" "$VOLUMES"
"$FERRY_BIN" serve --config "$W/west.yaml" >>"$W/west.log" 2>&1 & WP=$!
"$FERRY_BIN" serve --config "$W/east.yaml" >>"$W/east.log" 2>&1 & EP=$!
python3 "$ROOT/Benchmarks/replication-watch.py" wait --config "socket:$W/east/admin.sock" --timeout 600 >/dev/null
sed -e "s/^runtime=.*/runtime=${SECS}s/" -e "s/^ramp_time=.*/ramp_time=2s/" "$SHARED/bench/$JOB.fio" > "$W/job.fio"
case $TOOL in
    perf)
        perf record -F 999 -g -p "$EP" -o "$OUT/east.data" -- sleep "$SECS" >/dev/null 2>&1 & PP+=($!)
        perf record -F 999 -g -p "$WP" -o "$OUT/west.data" -- sleep "$SECS" >/dev/null 2>&1 & PP+=($!) ;;
    strace)
        timeout -s INT "$SECS" strace -c -f -p "$EP" -o "$OUT/east.strace" >/dev/null 2>&1 & PP+=($!)
        timeout -s INT "$SECS" strace -c -f -p "$WP" -o "$OUT/west.strace" >/dev/null 2>&1 & PP+=($!) ;;
    trace)
        (sleep 5; timeout -s INT 2 strace -y -ttt -f -p "$EP" -p "$WP" \
            -e trace=read,write,pwrite64,futex,epoll_wait,writev,readv,fdatasync -o "$OUT/both.trace" >/dev/null 2>&1) & PP+=($!) ;;
    "") ;;
    *) echo "unknown tool '$TOOL' (perf, strace or trace)" >&2; exit 2 ;;
esac
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
NBD_URI="nbd://127.0.0.1:$EN/v" fio --output-format=terse --terse-version=3 "$W/job.fio" > "$W/fio.out" & FP=$!
sleep 5; E0=$(cpu "$EP"); W0=$(cpu "$WP"); sleep 8; E1=$(cpu "$EP"); W1=$(cpu "$WP")
wait $FP
for p in "${PP[@]}"; do wait "$p" || true; done
PP=()
# terse v3: field 49 is write IOPS, 81 the mean latency (us); /proc ticks are 10 ms.
tail -1 "$W/fio.out" | awk -F';' -v e=$((E1 - E0)) -v w=$((W1 - W0)) '{
    printf "%s %s: %s IOPS, lat mean %.1f us; CPU per write: east %.1f us, west %.1f us\n",
        "'"$MODE"'", "'"$JOB"'", $49, $81, e * 10000 / ($49 * 8), w * 10000 / ($49 * 8) }'
