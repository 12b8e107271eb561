#!/usr/bin/env bash
# Benchmarks/nbd.sh -- Ferry's NBD server side by side with nbdkit (file plugin) and qemu-nbd,
# in one run, with the same fio job files (../shared/bench/*.fio), as a table with ratios to nbdkit.
#
# Usage: Benchmarks/nbd.sh [-r RUNTIME_S] [-R RAMP_S] [-j job1,job2] [-m] [-o JSON_DIR]
#   (options are passed to nbd-baselines.sh; defaults: 15 s measured, 3 s ramp, all four jobs)
#
# What it does: builds ferry in release mode (.build-release), creates a throwaway site with one
# 1 GiB volume in a temp dir, starts `ferry serve` on 127.0.0.1 at a free port, runs
# ../shared/bench/nbd-baselines.sh with ferry=nbd://127.0.0.1:PORT/vm1 (which also starts
# nbdkit and qemu-nbd on 1 GiB images of their own), then stops ferry by PID and removes the
# temp dir -- also on error and Ctrl-C. Every server serves a sparse raw file through the page
# cache and honours FLUSH with fdatasync (Ferry: reads and writes inline on its event loops).
# Measure on an otherwise idle machine; repeat before believing a ratio.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
SHARED="${FERRY_SHARED:-$ROOT/../shared}"
BASELINES="$SHARED/bench/nbd-baselines.sh"
[ -x "$BASELINES" ] || { echo "nbd.sh: $BASELINES not found; set FERRY_SHARED to the shared/ directory" >&2; exit 2; }

cd "$ROOT"
if [ -z "${FERRY_BIN:-}" ]; then
    swift build -c release --scratch-path .build-release >&2
    FERRY_BIN="$ROOT/.build-release/release/ferry"
fi

WORK="$(mktemp -d /tmp/ferry-bench-XXXXXX)"
FERRY_PID=""
cleanup() {
    if [ -n "$FERRY_PID" ] && kill -0 "$FERRY_PID" 2>/dev/null; then
        kill -TERM "$FERRY_PID"; wait "$FERRY_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NBD_PORT="$(port)"; REPL_PORT="$(port)"
"$FERRY_BIN" init --site bench --data "$WORK/bench" >/dev/null
cat > "$WORK/bench.yaml" <<YAML
site:
  name: bench
  data: $WORK/bench
listen:
  replication: 127.0.0.1:$REPL_PORT
  nbd: 127.0.0.1:$NBD_PORT
volumes:
  vm1:
    size: 1G
    primary: bench
log-level: warning
YAML
"$FERRY_BIN" serve --config "$WORK/bench.yaml" 2> "$WORK/ferry.log" &
FERRY_PID=$!
for _ in $(seq 1 100); do
    "$FERRY_BIN" status --config "$WORK/bench.yaml" >/dev/null 2>&1 && break
    sleep 0.1
done
"$FERRY_BIN" status --config "$WORK/bench.yaml" >/dev/null || { cat "$WORK/ferry.log" >&2; exit 1; }

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), ferry $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" >&2
"$BASELINES" "$@" ferry="nbd://127.0.0.1:$NBD_PORT/vm1"
