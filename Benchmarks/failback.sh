#!/usr/bin/env bash
# Benchmarks/failback.sh -- the failback resync of issue 10, side by side with nbdcopy.
#
# Usage: Benchmarks/failback.sh [PERCENT]   (default 10)
#
# Two sites on 127.0.0.1, a 1 GiB sync volume primary on east, filled and in sync. East is killed
# with kill -9, west is promoted and PERCENT % of the volume is rewritten there in random 64 KiB
# blocks (fio, each block once). East is restarted: it gives way, and west sends it what differs.
# Timed from east's start until west reports east in sync and drained (and, for the rate, from
# when west starts sending); the bytes west sent are read from its status. The baseline copies
# the same number of bytes with `nbdcopy --flush` between two nbdkit file servers (the rate of a
# plain NBD copy on loopback).
# Prints both rates and their ratio. Everything started is stopped by PID, also on error.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=lib.sh
. "$ROOT/Benchmarks/lib.sh"
PERCENT=${1:-10}
ferry_binary
W=$(mktemp -d /tmp/ferry-failback-XXXX)
EP=""; WP=""; KP=()
cleanup() { for p in "${KP[@]}"; do stop "$p" 5; done; stop "$EP"; stop "$WP"; rm -rf "$W"; }
trap cleanup EXIT
ER=$(port); EN=$(port); WR=$(port); WN=$(port)
for s in east west; do "$FERRY_BIN" init --site $s --data "$W/$s" >/dev/null; done
EID=$("$FERRY_BIN" id --data "$W/east" | cut -d' ' -f1); WID=$("$FERRY_BIN" id --data "$W/west" | cut -d' ' -f1)
VOLUMES="volumes:
  v:
    size: 1G
    primary: east
    replicas:
      west: { mode: sync }"
site_config "$W" east "$ER" "$EN" west "$WR" "$WID" "$VOLUMES"; site_config "$W" west "$WR" "$WN" east "$ER" "$EID" "$VOLUMES"
start_east() { "$FERRY_BIN" serve --config "$W/east.yaml" >>"$W/east.log" 2>&1 & EP=$!; }
"$FERRY_BIN" serve --config "$W/west.yaml" >>"$W/west.log" 2>&1 & WP=$!
start_east
python3 "$ROOT/Benchmarks/replication-watch.py" wait --config "socket:$W/east/admin.sock" --timeout 600 >/dev/null
fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$EN/v" --rw=write --bs=1m --iodepth=8 --size=1G --end_fsync=1 >/dev/null
python3 "$ROOT/Benchmarks/replication-watch.py" wait --config "socket:$W/east/admin.sock" --drained --timeout 600 >/dev/null

kill -KILL "$EP"; wait "$EP" 2>/dev/null || true; EP=""
for i in $(seq 100); do "$FERRY_BIN" promote v --config "$W/west.yaml" >/dev/null 2>&1 && break; sleep 0.1; done
CHANGED=$((1024 * PERCENT / 100))M
fio --name=change --ioengine=nbd --uri="nbd://127.0.0.1:$WN/v" --rw=randwrite --bs=64k --iodepth=16 --size=1G \
    --io_size="$CHANGED" --randrepeat=0 >/dev/null
sent() { "$FERRY_BIN" status --json --config "$W/west.yaml" | python3 -c '
import json, sys
v = [v for v in json.load(sys.stdin)["volumes"] if v["name"] == "v"][0]
print(sum(r.get("bytesSent", 0) for r in v["replicas"] if r["peer"] == "east"))'; }
BEFORE=$(sent)
T0=$(date +%s.%N)
start_east
# When west starts sending (east has given way and opened as its secondary): the copy itself.
catching_up() { "$FERRY_BIN" status --json --config "$W/west.yaml" | python3 -c '
import json, sys
v = [v for v in json.load(sys.stdin)["volumes"] if v["name"] == "v"][0]
sys.exit(0 if any(r["peer"] == "east" and r["state"] in ("catching-up", "in-sync") for r in v["replicas"]) else 1)'; }
for i in $(seq 2000); do catching_up && break; sleep 0.005; done
TC=$(date +%s.%N)
python3 "$ROOT/Benchmarks/replication-watch.py" wait --config "socket:$W/west/admin.sock" --drained --timeout 600 >/dev/null
T1=$(date +%s.%N)
BYTES=$(( $(sent) - BEFORE ))
CHANGED_BYTES=$((1024 * 1024 * 1024 * PERCENT / 100))

# The baseline: the same bytes with nbdcopy --flush between two nbdkit file servers.
head -c "$BYTES" /dev/urandom > "$W/src.img"; truncate -s "$BYTES" "$W/dst.img"
SP=$(port); DP=$(port)
nbdkit --exit-with-parent -f -i 127.0.0.1 -p "$SP" file "$W/src.img" & KP+=($!)
nbdkit --exit-with-parent -f -i 127.0.0.1 -p "$DP" file "$W/dst.img" & KP+=($!)
for i in $(seq 50); do nbdinfo --size "nbd://127.0.0.1:$DP" >/dev/null 2>&1 && nbdinfo --size "nbd://127.0.0.1:$SP" >/dev/null 2>&1 && break; sleep 0.1; done
N0=$(date +%s.%N)
nbdcopy --flush "nbd://127.0.0.1:$SP" "nbd://127.0.0.1:$DP"
N1=$(date +%s.%N)
python3 - "$T0" "$T1" "$N0" "$N1" "$BYTES" "$CHANGED_BYTES" "$PERCENT" "$TC" <<'PY'
import sys
t0, t1, n0, n1 = map(float, sys.argv[1:5]); sent, changed, pct = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
tc = float(sys.argv[8])
f = sent / (t1 - tc) / 2**20; n = sent / (n1 - n0) / 2**20
print(f"failback of a 1 GiB sync volume, {pct}% rewritten in random 64 KiB blocks on the promoted site:")
print(f"  ferry: {sent} bytes sent for {changed} changed ({sent / changed:.3f}x); east start to in sync "
      f"{t1 - t0:.2f} s (start-up and handshake {tc - t0:.2f} s), the copy {t1 - tc:.2f} s: {f:.0f} MiB/s")
print(f"  nbdcopy --flush of {sent} bytes between nbdkit file servers: {n1 - n0:.2f} s: {n:.0f} MiB/s")
print(f"  ratio ferry/nbdcopy: {f / n:.2f} (target >= 0.8)")
PY
