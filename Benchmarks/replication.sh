#!/usr/bin/env bash
# Benchmarks/replication.sh -- Ferry's NBD write path with each replication mode, side by side with
# nbdkit, qemu-nbd, an unreplicated Ferry volume and QEMU's synchronous mirror, in ONE run with the
# same fio job files (../shared/bench/*.fio), as one table with ratios to nbdkit.
#
# Usage: Benchmarks/replication.sh [-r RUNTIME_S] [-R RAMP_S] [-j job1,job2] [-m] [-o JSON_DIR]
#   (-r/-R/-j/-m/-o go to nbd-baselines.sh; defaults: 15 s measured, 3 s ramp, all four jobs)
#   FERRY_BIN=path   use this ferry binary instead of building .build-release
#   FERRY_SHARED=dir the shared/ directory (default ../shared next to the repository)
#
# What it does, all on 127.0.0.1 and in one temp dir (removed at the end):
#  * builds ferry in release mode (.build-release) unless FERRY_BIN is set;
#  * `ferry init`s two sites, east and west, and writes their configs, each pinning the other's
#    site ID (`ferry id --data DIR`); five 1 GiB volumes, primary east, the same list on both:
#      plain  no replicas                        -> row "ferry"
#      sync   west { mode: sync }                -> row "ferry-sync"
#      semi   west { mode: semi-sync }           -> row "ferry-semi"
#      async  west { mode: async, max-lag: 1G }  -> row "ferry-async" (on-lag: throttle, the default)
#      hist   west { mode: sync }, history: 1h   -> row "ferry-sync-hist" (west keeps recovery points:
#             an undo log of what each write overwrites, fdatasync'd before the write)
#    starts both with `ferry serve` and waits until every replica is in-sync and consistent;
#  * starts ../shared/bench/qemu-sync-mirror.py on its own pair of 1 GiB images (row "qemu-mirror");
#  * polls `ferry status --json` on east once a second in the background (lag samples);
#  * runs Benchmarks/nbd-baselines.sh (a copy of ../shared/bench/nbd-baselines.sh with two added
#    options; see its header) with the six extra servers. Its -H hook (replication-watch.py hook)
#    waits before and after every fio run until every replica on east is in-sync with nothing
#    lagging, in flight or dirty -- so the async volume's backlog is drained before the next row
#    starts and never runs into it; the same wait sits between randread's unmeasured prefill and
#    the measured reads (the copy runs a job file's sections as separate fio processes when it
#    has a hook) -- and records, for the replicated rows, the bytes written (counted exactly
#    from the fio connection, ramp included: -w) and the bytes Ferry sent;
#  * prints the table, then per replicated row: written vs sent, the max lag seen (lagBytes,
#    lagSeconds) and how long the backlog took to drain; then checks that each replica image is
#    identical to east's (cmp);
#  * stops everything it started by PID -- also on error, Ctrl-C or SIGTERM.
# Setup takes a while: even empty volumes get a first full copy before the replicas are in sync.
# Measure on an otherwise idle machine; repeat before believing a ratio.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
SHARED="${FERRY_SHARED:-$ROOT/../shared}"
MIRROR="$SHARED/bench/qemu-sync-mirror.py"
BASELINES="$HERE/nbd-baselines.sh"
WATCH="$HERE/replication-watch.py"
die() { echo "replication.sh: $*" >&2; exit 2; }
# shellcheck source=lib.sh
. "$HERE/lib.sh"   # ferry_binary, stop, port
[ -f "$MIRROR" ] || die "$MIRROR not found; set FERRY_SHARED to the shared/ directory"
export FERRY_SHARED="$SHARED"

PASS=()
MARKDOWN=()
while [ $# -gt 0 ]; do
    case "$1" in
        -r|-R|-j|-o) [ $# -ge 2 ] || die "$1 needs a value"; PASS+=("$1" "$2"); shift 2 ;;
        -m) PASS+=(-m); MARKDOWN=(-m); shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (try -h)" ;;
    esac
done
for tool in fio nbdkit qemu-nbd qemu-storage-daemon python3 ss cmp; do
    command -v "$tool" >/dev/null || die "$tool not found (make bench-replication installs what is needed)"
done

cd "$ROOT"
ferry_binary

WORK="$(mktemp -d /tmp/ferry-repl-XXXXXX)"
EAST_PID="" WEST_PID="" MIRROR_PID="" POLL_PID="" BASE_PID=""
cleanup() {
    local rc=$?
    trap - EXIT
    trap '' INT TERM    # a second signal must not cut the cleanup short
    stop "$BASE_PID" 60          # nbd-baselines.sh stops its own fio and servers
    stop "$POLL_PID"
    stop "$MIRROR_PID" 90        # cancels the mirror job, quits qemu-storage-daemon, stops nbdkit
    stop "$EAST_PID"
    stop "$WEST_PID"
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ]; then
        local keep
        keep=$(mktemp -d /tmp/ferry-repl-logs-XXXXXX)
        find "$WORK" -name '*.log' -size -64M -exec cp --parents {} "$keep" \; 2>/dev/null || true
        echo "replication.sh: failed (status $rc); logs kept in $keep" >&2
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "replication.sh: interrupted" >&2; exit 130' INT
trap 'echo "replication.sh: terminated" >&2; exit 143' TERM

EAST_REPL=$(port); EAST_NBD=$(port); WEST_REPL=$(port); WEST_NBD=$(port)
for s in east west; do "$FERRY_BIN" init --site "$s" --data "$WORK/$s" >/dev/null; done
EAST_ID=$("$FERRY_BIN" id --data "$WORK/east" | cut -d' ' -f1)
WEST_ID=$("$FERRY_BIN" id --data "$WORK/west" | cut -d' ' -f1)

VOLUMES="volumes:
  plain:
    size: 1G
    primary: east
  sync:
    size: 1G
    primary: east
    replicas:
      west: { mode: sync }
  semi:
    size: 1G
    primary: east
    replicas:
      west: { mode: semi-sync }
  async:
    size: 1G
    primary: east
    replicas:
      west: { mode: async, max-lag: 1G }
  hist:
    size: 1G
    primary: east
    history: 1h
    replicas:
      west: { mode: sync }"
site_config "$WORK" east "$EAST_REPL" "$EAST_NBD" west "$WEST_REPL" "$WEST_ID" "$VOLUMES"
site_config "$WORK" west "$WEST_REPL" "$WEST_NBD" east "$EAST_REPL" "$EAST_ID" "$VOLUMES"

# up NAME PID: wait until the site's admin API answers (30 s).
up() {
    local i
    for i in $(seq 300); do
        "$FERRY_BIN" status --config "$WORK/$1.yaml" >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$WORK/$1.log" >&2
    die "$1 did not start"
}
"$FERRY_BIN" serve --config "$WORK/west.yaml" >>"$WORK/west.log" 2>&1 &
WEST_PID=$!
"$FERRY_BIN" serve --config "$WORK/east.yaml" >>"$WORK/east.log" 2>&1 &
EAST_PID=$!
up west "$WEST_PID"
up east "$EAST_PID"
export FERRY_BENCH_PIDS="east=$EAST_PID,west=$WEST_PID"   # waits stop at once if one exits
echo "east (pid $EAST_PID) and west (pid $WEST_PID) up; waiting for the replicas to be in sync" >&2
# Even empty volumes get a first full copy (holes go as zeroing); allow for a slow machine.
t=$(python3 "$WATCH" wait --config "socket:$WORK/east/admin.sock" --timeout 3600 --progress 30) \
    || { tail -n 20 "$WORK/east.log" "$WORK/west.log" >&2; exit 1; }
echo "replicas in sync after ${t}s" >&2

mkdir -p "$WORK/mirror"
truncate -s 1G "$WORK/mirror/primary.img"
python3 "$MIRROR" "$WORK/mirror/primary.img" "$WORK/mirror/target.img" >"$WORK/mirror.uri" 2>"$WORK/mirror.log" &
MIRROR_PID=$!
for _ in $(seq 1200); do
    [ -s "$WORK/mirror.uri" ] && break
    kill -0 "$MIRROR_PID" 2>/dev/null || { cat "$WORK/mirror.log" >&2; die "qemu-sync-mirror.py exited"; }
    sleep 0.1
done
[ -s "$WORK/mirror.uri" ] || { cat "$WORK/mirror.log" >&2; die "qemu-sync-mirror.py did not print its URI"; }

python3 "$WATCH" poll --config "$WORK/east.yaml" --out "$WORK/lag.jsonl" --interval 1 2>>"$WORK/poll.log" &
POLL_PID=$!

mkdir -p "$WORK/state"
export FERRY_BENCH_CONFIG="socket:$WORK/east/admin.sock"
export FERRY_BENCH_STATE="$WORK/state"
export FERRY_BENCH_VOLUMES="ferry-sync=sync,ferry-semi=semi,ferry-async=async,ferry-sync-hist=hist"
U="nbd://127.0.0.1:$EAST_NBD"
echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), ferry $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- Sources 2>/dev/null || echo '+local changes') (binary built $(date -u -r "$FERRY_BIN" +%Y-%m-%dT%H:%MZ))" >&2
"$BASELINES" "${PASS[@]}" -H "python3 $WATCH hook" -w ferry-sync,ferry-semi,ferry-async,ferry-sync-hist \
    ferry="$U/plain" ferry-sync="$U/sync" ferry-semi="$U/semi" ferry-async="$U/async" ferry-sync-hist="$U/hist" \
    qemu-mirror="$(cat "$WORK/mirror.uri")" &
BASE_PID=$!
rc=0; wait "$BASE_PID" || rc=$?
BASE_PID=""
stop "$POLL_PID"; POLL_PID=""

echo
echo "Replicated rows: bytes written (exact, ramp included) against bytes Ferry sent to west;"
echo "max lag seen (1 s 'ferry status --json' polls plus the drain polls); time for the backlog to"
echo "drain after fio ended (all replicas in-sync, nothing lagging, in flight or dirty)."
python3 "$WATCH" summary --state "$WORK/state" --samples "$WORK/lag.jsonl" "${MARKDOWN[@]}"

same=()
for v in sync semi async hist; do
    if cmp -s "$WORK/east/volumes/$v.img" "$WORK/west/volumes/$v.img"; then same+=("$v identical")
    else same+=("$v DIFFERS"); rc=1; fi
done
echo "replica images against east's after the run: ${same[*]}"
exit "$rc"
