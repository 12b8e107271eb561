#!/usr/bin/env bash
# Benchmarks/sync-rates.sh -- how fast Ferry brings a replica up to date, in one run:
#
#  (a) initial sync: a volume on east (1 GiB by default) with every other 1 MiB chunk written
#      (half data, half holes; fio's nbd engine, rw=write:1m) before west has ever been started;
#      then west starts, and the time until east reports the replica `in-sync` and consistent is
#      measured (from the moment west is started, polling east's admin socket every 0.1 s).
#      Compared with nbdcopy between two nbdkit file servers in the same run: source = a sparse
#      copy of the same image (cp --sparse=always of east's image), destination = an empty sparse
#      image; nbdcopy reads the source's extents and skips holes. Shown twice: plain
#      `nbdcopy SRC DST` and `nbdcopy --flush SRC DST` (the destination fdatasync'd at the end, as
#      a Ferry replica is before it reports the copy consistent). MB/s = data bytes (10^6) per second.
#  (b) catch-up: a second pair of sites with a sync replica in sync; west is stopped (SIGTERM);
#      10% of the volume's 4 KiB blocks are written at random (fio randwrite bs=4k, io_size=10%,
#      random map on, so no block twice; randrepeat=0) while east runs degraded; west is started
#      again and the time until the replica is in-sync with nothing dirty is measured, with the
#      bytes east sent during the catch-up against the dirty bytes written (target <= 1.05x).
#  Both check at the end that west's image is identical to east's (cmp).
#
# Usage: Benchmarks/sync-rates.sh [-M async|sync] [-s SIZE] [-r S] [-R S]
#   -M MODE  replica mode for (a) (default async); (b) always uses sync
#   -s SIZE  volume size, a multiple of 2 MiB (default 1G)
#   -r, -R   accepted for symmetry with replication.sh and ignored (nothing here is time-based)
#   FERRY_BIN=path   use this ferry binary instead of building .build-release
#
# Everything runs on 127.0.0.1 in one temp dir, removed at the end; every process it starts
# (ferry sites, nbdkit, fio, nbdcopy) is stopped by PID, also on error, Ctrl-C or SIGTERM.
# `sync` is run before each timed phase so earlier writeback does not land in it.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
WATCH="$HERE/replication-watch.py"
die() { echo "sync-rates.sh: $*" >&2; exit 2; }
# shellcheck source=lib.sh
. "$HERE/lib.sh"   # ferry_binary, stop, port

MODE=async
SIZE=1G
while [ $# -gt 0 ]; do
    case "$1" in
        -M) [ $# -ge 2 ] || die "$1 needs a value"; MODE=$2; shift 2 ;;
        -s) [ $# -ge 2 ] || die "$1 needs a value"; SIZE=$2; shift 2 ;;
        -r|-R) [ $# -ge 2 ] || die "$1 needs a value"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (try -h)" ;;
    esac
done
case "$MODE" in async|sync) ;; *) die "-M must be async or sync" ;; esac
BYTES=$(python3 -c 'import sys
s = sys.argv[1]; u = {"K": 10, "M": 20, "G": 30, "T": 40}
n = int(s[:-1]) << u[s[-1].upper()] if s[-1].upper() in u else int(s)
print(n)' "$SIZE") || die "bad size $SIZE"
[ $((BYTES % (2 << 20))) -eq 0 ] && [ "$BYTES" -gt 0 ] || die "size must be a positive multiple of 2 MiB"
for tool in fio nbdkit nbdcopy python3 cmp; do
    command -v "$tool" >/dev/null || die "$tool not found (make bench-replication installs what is needed)"
done

cd "$ROOT"
ferry_binary

WORK="$(mktemp -d /tmp/ferry-syncrates-XXXXXX)"
cd "$WORK"     # fio and nbdcopy run here
PIDS=()          # every long-running child, stopped in reverse order by cleanup
CHILD=""         # the foreground tool (fio, nbdcopy) while it runs
cleanup() {
    local rc=$? i
    trap - EXIT
    trap '' INT TERM    # a second signal must not cut the cleanup short
    stop "$CHILD"
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop "${PIDS[$i]}"; done
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 130 ] && [ "$rc" -ne 143 ]; then
        local keep
        keep=$(mktemp -d /tmp/ferry-syncrates-logs-XXXXXX)
        find "$WORK" -name '*.log' -size -64M -exec cp --parents {} "$keep" \; 2>/dev/null || true
        echo "sync-rates.sh: failed (status $rc); logs kept in $keep" >&2
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "sync-rates.sh: interrupted" >&2; exit 130' INT
trap 'echo "sync-rates.sh: terminated" >&2; exit 143' TERM

# run_fg CMD...: run a tool in the background and wait, so that a signal reaches the trap at once.
run_fg() { "$@" & CHILD=$!; local rc=0; wait "$CHILD" || rc=$?; CHILD=""; return "$rc"; }
now() { date +%s.%N; }
sub() { python3 -c 'import sys; print("%.2f" % (float(sys.argv[1]) - float(sys.argv[2])))' "$1" "$2"; }
# fio_bytes JSON: bytes fio wrote (all jobs)
fio_bytes() { python3 -c 'import json, sys
t = open(sys.argv[1]).read(); d = json.loads(t[t.index("{"):])
print(sum(j["write"]["io_bytes"] for j in d["jobs"]))' "$1"; }
field() { python3 -c 'import json, sys; v = json.loads(sys.argv[1]).get(sys.argv[2]); print("" if v is None else v)' "$1" "$2"; }
mib() { python3 -c 'import sys; print("%.1f" % (int(sys.argv[1]) / 1048576))' "$1"; }

# pair DIR MODE: init east and west under $WORK/DIR, configs pinning each other's site ID, one
# volume vm1 of $SIZE, primary east, replicated to west in MODE. Sets E_* and W_* variables.
pair() {
    local d=$WORK/$1 s
    mkdir -p "$d"
    E_REPL=$(port); E_NBD=$(port); W_REPL=$(port); W_NBD=$(port)
    for s in east west; do "$FERRY_BIN" init --site "$s" --data "$d/$s" >/dev/null; done
    local eid wid
    eid=$("$FERRY_BIN" id --data "$d/east" | cut -d' ' -f1)
    wid=$("$FERRY_BIN" id --data "$d/west" | cut -d' ' -f1)
    local vol="volumes:
  vm1:
    size: $SIZE
    primary: east
    replicas:
      west: { mode: $2 }
log-level: warning"
    printf 'site:\n  name: east\n  data: %s\nlisten:\n  replication: 127.0.0.1:%s\n  nbd: 127.0.0.1:%s\npeers:\n  west:\n    address: 127.0.0.1:%s\n    site-id: %s\n%s\n' \
        "$d/east" "$E_REPL" "$E_NBD" "$W_REPL" "$wid" "$vol" >"$d/east.yaml"
    printf 'site:\n  name: west\n  data: %s\nlisten:\n  replication: 127.0.0.1:%s\n  nbd: 127.0.0.1:%s\npeers:\n  east:\n    address: 127.0.0.1:%s\n    site-id: %s\n%s\n' \
        "$d/west" "$W_REPL" "$W_NBD" "$E_REPL" "$eid" "$vol" >"$d/west.yaml"
    E_CONF=$d/east.yaml; W_CONF=$d/west.yaml
    E_SOCK="socket:$d/east/admin.sock"
    E_IMG=$d/east/volumes/vm1.img; W_IMG=$d/west/volumes/vm1.img
    URI="nbd://127.0.0.1:$E_NBD/vm1"
}
# serve CONFIG: start a site, wait until its admin API answers; sets SERVED to its PID.
serve() {
    "$FERRY_BIN" serve --config "$1" >>"${1%.yaml}.log" 2>&1 &
    SERVED=$!
    PIDS+=("$SERVED")
    local i
    for i in $(seq 300); do
        "$FERRY_BIN" status --config "$1" >/dev/null 2>&1 && return 0
        kill -0 "$SERVED" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "${1%.yaml}.log" >&2
    die "the site of $1 did not start"
}
# replica: east's status entry for vm1's replica, as JSON.
replica() { python3 "$WATCH" get --config "$E_SOCK" vm1 west; }
# timed_wait TRACE [--drained]: wait (polling every 0.1 s) until the replica is in sync; gives
# up at once if east or west exits (replication-watch.py checks the PIDs).
timed_wait() {
    local trace=$1; shift
    FERRY_BENCH_PIDS="east=$CUR_EAST,west=$CUR_WEST" \
        run_fg python3 "$WATCH" wait --config "$E_SOCK" --interval 0.1 --timeout 3600 --progress 30 \
        --trace "$trace" "$@" >/dev/null || { tail -n 30 "${E_CONF%.yaml}.log" "${W_CONF%.yaml}.log" >&2; return 1; }
}
# first_connected TRACE: unix time of the first poll that saw the replica connected
first_connected() { python3 -c 'import json, sys
for line in open(sys.argv[1]):
    s = json.loads(line)
    if any(r.get("connected") for r in s["replicas"].values()):
        print(s["t"]); break
else:
    print("")' "$1"; }

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), ferry $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- Sources 2>/dev/null || echo '+local changes') (binary built $(date -u -r "$FERRY_BIN" +%Y-%m-%dT%H:%MZ)), $(fio --version), $(nbdkit --version), nbdcopy $(nbdcopy --version | head -1 | awk '{print $2}')"

# ------------------------------------------------------------------ (a) initial sync
pair a "$MODE"
serve "$E_CONF"; A_EAST=$SERVED; CUR_EAST=$SERVED
echo "(a) writing every other 1 MiB of $SIZE on east (west not started yet)" >&2
# rw=write:1m writes 1 MiB, skips 1 MiB; io_size stops it at the end instead of wrapping round.
run_fg fio --name=half --ioengine=nbd --uri="$URI" --rw=write:1m --bs=1m --iodepth=8 \
    --size="$BYTES" --io_size=$((BYTES / 2)) --direct=1 --output-format=json --output="$WORK/half.json" >"$WORK/half.log" 2>&1 \
    || { cat "$WORK/half.log" >&2; die "fio failed"; }
DATA=$(fio_bytes "$WORK/half.json")
cp --sparse=always "$E_IMG" "$WORK/src.img"
ALLOC=$(( $(stat -c %b "$WORK/src.img") * 512 ))
sync
echo "(a) starting west; waiting for the initial sync ($MODE replica)" >&2
T0=$(now)
serve "$W_CONF"; A_WEST=$SERVED; CUR_WEST=$SERVED
timed_wait "$WORK/a.trace" || die "the initial sync did not finish"
T1=$(now)
FERRY_S=$(sub "$T1" "$T0")
TC=$(first_connected "$WORK/a.trace")
LINK_S=$([ -n "$TC" ] && sub "$TC" "$T0" || echo "?")
A_SENT=$(field "$(replica)" bytesSent)
A_SAME=no; cmp -s "$E_IMG" "$W_IMG" && A_SAME=yes
stop "$A_EAST"; stop "$A_WEST"

# nbdcopy between two nbdkit file servers (the nbdkit settings of nbd-baselines.sh)
nbdkit_on() {   # nbdkit_on IMAGE [nbdkit options]: start it, set NK_URI
    local img=$1 p i; shift
    p=$(port)
    nbdkit --foreground --exit-with-parent --ipaddr 127.0.0.1 --port "$p" --threads 32 "$@" \
        file file="$img" >>"$WORK/nbdkit.log" 2>&1 &
    PIDS+=($!)
    for i in $(seq 150); do
        python3 -c 'import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
sys.exit(0 if s.recv(8) == b"NBDMAGIC" else 1)' "$p" 2>/dev/null && { NK_URI="nbd://127.0.0.1:$p/"; return 0; }
        sleep 0.1
    done
    die "nbdkit did not start"
}
nbdkit_on "$WORK/src.img" --readonly; SRC=$NK_URI
copy_run() {    # copy_run NAME [nbdcopy options]: sets COPY_S to the seconds it took
    local name=$1 t0 t1; shift
    rm -f "$WORK/$name.img"; truncate -s "$BYTES" "$WORK/$name.img"
    nbdkit_on "$WORK/$name.img"
    sync
    t0=$(now)
    run_fg nbdcopy "$@" "$SRC" "$NK_URI" >&2 || die "nbdcopy $* failed"
    t1=$(now)
    cmp -s "$WORK/src.img" "$WORK/$name.img" || die "nbdcopy $*: the copy differs from the source"
    COPY_S=$(sub "$t1" "$t0")
}
echo "(a) nbdcopy, the same image" >&2
copy_run dst; NC_S=$COPY_S
copy_run dstf --flush; NCF_S=$COPY_S

python3 - "$DATA" "$BYTES" "$ALLOC" "$MODE" "$FERRY_S" "$LINK_S" "$A_SENT" "$A_SAME" "$NC_S" "$NCF_S" <<'EOF'
import sys
data, size, alloc, mode, fs, link, sent, same, nc, ncf = sys.argv[1:]
data, size, alloc, sent = int(data), int(size), int(alloc), int(sent or 0)
fs, nc, ncf = float(fs), float(nc), float(ncf)
rate = lambda s: data / s / 1e6
print()
print("(a) initial sync: %d MiB volume, %d MiB of data (every other 1 MiB), the rest holes "
      "(%d MiB allocated in the source image)" % (size >> 20, data >> 20, alloc >> 20))
rows = [("ferry, %s replica" % mode, fs, "-"),
        ("nbdcopy", nc, "%.2fx" % (rate(fs) / rate(nc))),
        ("nbdcopy --flush", ncf, "%.2fx" % (rate(fs) / rate(ncf)))]
print("  %-22s %9s %11s %15s" % ("", "seconds", "data MB/s", "ferry vs this"))
for name, s, r in rows:
    print("  %-22s %9.2f %11.1f %15s" % (name, s, rate(s), r))
print("  ferry: timed from starting west (link up after %s s) to in-sync and consistent; "
      "%.1f MiB of data sent (%.3fx the data); replica image identical to east's: %s"
      % (link, sent / 1048576, sent / data if data else 0, same))
EOF

# ------------------------------------------------------------------ (b) catch-up
pair b sync
serve "$W_CONF"; B_WEST=$SERVED; CUR_WEST=$SERVED
serve "$E_CONF"; B_EAST=$SERVED; CUR_EAST=$SERVED
echo "(b) waiting for the sync replica's first copy (the volume is empty: all holes)" >&2
T0=$(now)
timed_wait "$WORK/b0.trace" || die "the sync replica never got in sync"
B_FIRST=$(sub "$(now)" "$T0")
stop "$B_WEST"
for _ in $(seq 600); do
    [ "$(field "$(replica)" connected)" = "False" ] && break
    sleep 0.1
done
[ "$(field "$(replica)" connected)" = "False" ] || die "east still sees west connected"
IO=$((BYTES / 10 / 4096 * 4096))
echo "(b) west stopped; writing $((IO >> 20)) MiB of random 4 KiB blocks on east" >&2
run_fg fio --name=dirty --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=32 \
    --size="$BYTES" --io_size="$IO" --norandommap=0 --randrepeat=0 --direct=1 \
    --output-format=json --output="$WORK/dirty.json" >"$WORK/dirty.log" 2>&1 \
    || { cat "$WORK/dirty.log" >&2; die "fio failed"; }
DIRTY=$(fio_bytes "$WORK/dirty.json")
R=$(replica)
B_STATE=$(field "$R" state); B_MARKED=$(field "$R" dirtyBytes); S0=$(field "$R" bytesSent)
sync
echo "(b) starting west; waiting for the catch-up" >&2
T0=$(now)
serve "$W_CONF"; B_WEST=$SERVED; CUR_WEST=$SERVED
timed_wait "$WORK/b.trace" --drained || die "the catch-up did not finish"
T1=$(now)
R=$(replica)
S1=$(field "$R" bytesSent)
TC=$(first_connected "$WORK/b.trace")
B_SAME=no; cmp -s "$E_IMG" "$W_IMG" && B_SAME=yes

python3 - "$DIRTY" "$BYTES" "$B_STATE" "$B_MARKED" "$S0" "$S1" "$(sub "$T1" "$T0")" \
    "$([ -n "$TC" ] && sub "$TC" "$T0" || echo "?")" "$B_SAME" "$B_FIRST" <<'EOF'
import sys
dirty, size, state, marked, s0, s1, secs, link, same, first = sys.argv[1:]
dirty, size, marked, s0, s1, secs = int(dirty), int(size), int(marked or 0), int(s0), int(s1), float(secs)
sent = s1 - s0
ratio = sent / dirty
print()
print("(b) catch-up of a sync replica: west stopped, %d random 4 KiB blocks written on east "
      "(%.1f MiB, %.1f%% of the volume, no block twice), west started again"
      % (dirty // 4096, dirty / 1048576, 100 * dirty / size))
print("  (before: the first copy of the still empty volume, all holes, took %s s)" % first)
print("  east while west was down: state %s, %.1f MiB marked dirty (%.2fx the bytes written)"
      % (state, marked / 1048576, marked / dirty))
print("  catch-up: %.1f MiB sent = %.3fx the dirty bytes written (target <= 1.05x: %s)"
      % (sent / 1048576, ratio, "met" if ratio <= 1.05 else "NOT met"))
print("  time: %.2f s from starting west to in-sync with nothing dirty (link up after %s s); "
      "%.1f MB/s of data sent" % (secs, link, sent / secs / 1e6))
print("  replica image identical to east's: %s" % same)
EOF
[ "$A_SAME" = yes ] && [ "$B_SAME" = yes ]
