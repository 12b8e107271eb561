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
# temp dir -- also on error and Ctrl-C. A second daemon, `ferry-metrics`, is the same with
# listen.metrics on (every request recorded, /metrics scraped each second): issue 12 asks it
# to stay at 0.97x `ferry` or better. Every server serves a sparse raw file through the page
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
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; fi
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Two daemons, alike but for the metrics listener: `ferry` records nothing, `ferry-metrics`
# records every request (ferry_nbd_*) and is scraped once a second, as Prometheus would.
start_ferry() {   # NAME NBD_PORT [EXTRA LISTEN LINE]
    local name=$1 nbd=$2 extra=${3:-}
    "$FERRY_BIN" init --site "$name" --data "$WORK/$name" >/dev/null
    cat > "$WORK/$name.yaml" <<YAML
site:
  name: $name
  data: $WORK/$name
listen:
  replication: 127.0.0.1:$(port)
  nbd: 127.0.0.1:$nbd
$extra
volumes:
  vm1:
    size: 1G
    primary: $name
log-level: warning
YAML
    "$FERRY_BIN" serve --config "$WORK/$name.yaml" 2> "$WORK/$name.log" &
    PIDS+=($!)
    for _ in $(seq 1 100); do
        "$FERRY_BIN" status --config "$WORK/$name.yaml" >/dev/null 2>&1 && break
        sleep 0.1
    done
    "$FERRY_BIN" status --config "$WORK/$name.yaml" >/dev/null || { cat "$WORK/$name.log" >&2; exit 1; }
}
NBD_PORT="$(port)"; METRICS_NBD_PORT="$(port)"; METRICS_PORT="$(port)"
start_ferry bench "$NBD_PORT"
start_ferry metered "$METRICS_NBD_PORT" "  metrics: 127.0.0.1:$METRICS_PORT"
( while sleep 1; do curl -s -o /dev/null "http://127.0.0.1:$METRICS_PORT/metrics" || true; done ) &
PIDS+=($!)

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), ferry $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" >&2
# FERRY_METRICS_FIRST=1 runs ferry-metrics before ferry in each job (to see what order costs);
# FERRY_METRICS_ABAB=1 runs both twice, alternating (ferry, ferry-metrics, ferry-2, ferry-metrics-2),
# so that drift of the machine during a job falls on both alike.
PLAIN="nbd://127.0.0.1:$NBD_PORT/vm1"; METERED="nbd://127.0.0.1:$METRICS_NBD_PORT/vm1"
if [ "${FERRY_METRICS_ABAB:-0}" = 1 ]; then
    "$BASELINES" "$@" ferry="$PLAIN" ferry-metrics="$METERED" ferry-2="$PLAIN" ferry-metrics-2="$METERED"
elif [ "${FERRY_METRICS_FIRST:-0}" = 1 ]; then
    "$BASELINES" "$@" ferry-metrics="$METERED" ferry="$PLAIN"
else
    "$BASELINES" "$@" ferry="$PLAIN" ferry-metrics="$METERED"
fi
