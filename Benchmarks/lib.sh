# Benchmarks/lib.sh -- helpers the benchmark scripts share; sourced, not run.
# Expects ROOT (the repository) to be set by the script that sources it.

# ferry_binary: FERRY_BIN, or the release build (built in .build-release first); exported.
ferry_binary() {
    if [ -z "${FERRY_BIN:-}" ]; then
        (cd "$ROOT" && swift build -c release --scratch-path .build-release >&2)
        FERRY_BIN="$ROOT/.build-release/release/ferry"
    fi
    export FERRY_BIN
}

# stop PID [SECONDS]: SIGTERM, wait up to SECONDS (default 30), then SIGKILL.
stop() {
    local pid=$1 i
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq $((${2:-30} * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# port: a free TCP port on 127.0.0.1.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# site_config DIR NAME REPL_PORT NBD_PORT PEER PEER_REPL_PORT PEER_ID VOLUMES: writes DIR/NAME.yaml,
# a site on 127.0.0.1 with data in DIR/NAME, one pinned peer, and VOLUMES (a `volumes:` block).
site_config() {
    cat > "$1/$2.yaml" <<YAML
site:
  name: $2
  data: $1/$2
listen:
  replication: 127.0.0.1:$3
  nbd: 127.0.0.1:$4
peers:
  $5:
    address: 127.0.0.1:$6
    site-id: $7
$8
log-level: warning
YAML
}
