#!/usr/bin/env bash
# Benchmarks/nbd-baselines.sh -- a copy of ../shared/bench/nbd-baselines.sh, extended for
# Benchmarks/replication.sh with two options (-H, -w); without them it behaves like the original.
# It runs the shared fio NBD job files against nbdkit (file plugin) and qemu-nbd, plus any extra
# servers given as NAME=URI, and prints one side-by-side table (IOPS, MB/s, completion latency,
# ratio to nbdkit).
#
# Usage:
#   nbd-baselines.sh [options] [NAME=URI ...]
#
#   -r, --runtime SECONDS  measured seconds per job and server (default 15)
#   -R, --ramp SECONDS     unmeasured warm-up before each measurement (default 3)
#   -j, --jobs LIST        comma-separated job names (default: all four, i.e.
#                          randwrite-4k-qd1,randwrite-4k-qd32,randread-4k-qd32,seqwrite-1m-qd8)
#   -o, --keep-json DIR    copy every raw fio JSON result into DIR
#   -m, --markdown         print the table as Markdown instead of plain text
#   -H, --hook CMD         (added) run `CMD before JOB SERVER URI RUNDIR` before each fio run and
#                          `CMD after JOB SERVER URI RUNDIR` after it, for every server (CMD is
#                          split on spaces). The after-hook is where a caller waits until
#                          background work the run left behind (an async replica's backlog) is
#                          done, so that it does not bleed into the next row; nothing is timed
#                          while a hook runs. With a hook, each [section] of a job file runs as
#                          its own fio process (--section), with `CMD drain ...` in between, so
#                          the unmeasured prefill of randread-4k-qd32 cannot leave a backlog
#                          behind for the measured reads either (each fio job has its own NBD
#                          connection anyway; the table uses the last section). A failing hook
#                          is reported and the run goes on; a hook exiting with status 99 stops
#                          the run (as an error). RUNDIR is fio's working directory
#                          for the run: fio.N.json per section, with -w the *.postrun.txt files.
#   -w, --count-writes LIST (added) comma-separated server names (TCP URIs only). fio's own byte
#                          counts leave out the ramp; for these servers each fio job also gets an
#                          exec_postrun that records the server-side TCP counters of its connection
#                          (`ss -ti`, read after the job ends but before fio closes the connection),
#                          from which RUNDIR/written (bytes written by all jobs of the run, ramp
#                          included, exact) is computed. The measurement itself is unchanged.
#   -h, --help
#   NAME=URI               extra server, e.g. ferry=nbd://127.0.0.1:10809/vm1
#                          or qemu-mirror=nbd://127.0.0.1:PORT/mirror (see
#                          qemu-sync-mirror.py). Its export must be >= 1 GiB and
#                          WILL BE OVERWRITTEN (first 1 GiB).
#
# The fio job files are read from $NBD_JOB_DIR (default: ../../shared/bench next to this file,
# or $FERRY_SHARED/bench).
#
# Example:
#   ./nbd-baselines.sh -r 15 ferry=nbd://127.0.0.1:10809/vm1
#
# Needs only Debian 12 packages: fio (3.33 has ioengine=nbd built in, via
# libnbd), nbdkit, qemu-utils (qemu-nbd), python3 (stdlib only, for the JSON),
# iproute2 (ss, for -w).
#
# What it does: makes a temp dir (mktemp -d), creates one 1 GiB sparse raw image
# per built-in server there, starts nbdkit and qemu-nbd in the background on
# 127.0.0.1 at free ports (PIDs remembered), runs every job against every server
# (job-major order, so each job's servers run back to back under similar
# machine load), stops the servers by PID and deletes the temp dir -- also on
# error, Ctrl-C or SIGTERM (trap).
#
# Server settings (chosen to be fair to each other, and each as fast as it goes
# on a plain file):
#  * Both serve a raw file through the host PAGE CACHE and honour NBD FLUSH with
#    fdatasync. That is the default mode of both servers and what a file-backed
#    daemon normally does. O_DIRECT is not comparable between them: qemu-nbd
#    --cache=none uses O_DIRECT, while nbdkit's cache=none is NOT O_DIRECT (it
#    evicts pages after each request; 2-3x slower here).
#  * nbdkit: `--threads 32` (default 16) so one connection can have the full
#    QD32 in the plugin at once; `file` plugin, cache=default, fadvise=normal
#    (the defaults; fadvise only changes read-ahead, and the data set sits in
#    the page cache anyway). Trim = hole punching, always on.
#    `--exit-with-parent` so it cannot outlive this script even on SIGKILL.
#  * qemu-nbd: `-f raw` (no probing), `--cache=writeback` (page cache + flush,
#    the qemu-nbd default, stated explicitly), `--aio=threads` (measured faster
#    than io_uring for buffered I/O here; `native` needs O_DIRECT),
#    `--discard=unmap` (trim punches holes, like nbdkit), `-t` (persistent: keep
#    serving after a client disconnects, fio connects once per job),
#    `-e 0` (unlimited shared connections; the default allows 1).
set -euo pipefail

RUNTIME=15
RAMP=3
JOBS="randwrite-4k-qd1,randwrite-4k-qd32,randread-4k-qd32,seqwrite-1m-qd8"
KEEP_JSON=""
MARKDOWN=0
IMG_SIZE=1G
EXTRA_NAMES=()
EXTRA_URIS=()
HOOK=""
COUNT_WRITES=""

die() { echo "nbd-baselines: $*" >&2; exit 1; }
usage() { sed -n '2,/^# Needs only/{/^# Needs only/d;s/^# \{0,1\}//;p}' "$0"; }

while [ $# -gt 0 ]; do
    case "$1" in
        -r|--runtime) [ $# -ge 2 ] || die "$1 needs a value"; RUNTIME=$2; shift 2 ;;
        --runtime=*)  RUNTIME=${1#*=}; shift ;;
        -R|--ramp)    [ $# -ge 2 ] || die "$1 needs a value"; RAMP=$2; shift 2 ;;
        --ramp=*)     RAMP=${1#*=}; shift ;;
        -j|--jobs)    [ $# -ge 2 ] || die "$1 needs a value"; JOBS=$2; shift 2 ;;
        --jobs=*)     JOBS=${1#*=}; shift ;;
        -o|--keep-json) [ $# -ge 2 ] || die "$1 needs a value"; KEEP_JSON=$2; shift 2 ;;
        --keep-json=*)  KEEP_JSON=${1#*=}; shift ;;
        -m|--markdown) MARKDOWN=1; shift ;;
        -H|--hook)    [ $# -ge 2 ] || die "$1 needs a value"; HOOK=$2; shift 2 ;;
        --hook=*)     HOOK=${1#*=}; shift ;;
        -w|--count-writes) [ $# -ge 2 ] || die "$1 needs a value"; COUNT_WRITES=$2; shift 2 ;;
        --count-writes=*)  COUNT_WRITES=${1#*=}; shift ;;
        -h|--help)    usage; exit 0 ;;
        *=*)
            name=${1%%=*}; uri=${1#*=}
            [[ $name =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad server name '$name'"
            case " nbdkit qemu-nbd ${EXTRA_NAMES[*]:-} " in
                *" $name "*) die "duplicate server name '$name'" ;;
            esac
            [[ $uri == nbd* ]] || die "'$uri' does not look like an NBD URI"
            EXTRA_NAMES+=("$name"); EXTRA_URIS+=("$uri"); shift ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
done
[[ $RUNTIME =~ ^[0-9]+$ && $RUNTIME -gt 0 ]] || die "runtime must be a positive integer (seconds)"
[[ $RAMP =~ ^[0-9]+$ ]] || die "ramp must be an integer (seconds)"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_DIR=${NBD_JOB_DIR:-${FERRY_SHARED:-$HERE/../../shared}/bench}
[ -d "$BENCH_DIR" ] || die "no job directory $BENCH_DIR; set NBD_JOB_DIR (or FERRY_SHARED)"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
IFS=, read -r -a JOB_LIST <<<"$JOBS"
for j in "${JOB_LIST[@]}"; do
    [ -f "$BENCH_DIR/$j.fio" ] || die "no job file $j.fio in $BENCH_DIR"
done
[ -z "$COUNT_WRITES" ] || command -v ss >/dev/null || die "ss not found (apt-get install -y iproute2)"
for tool in fio nbdkit qemu-nbd python3; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y fio nbdkit qemu-utils python3)"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd ioengine (needs fio built with libnbd)"

# ---------------------------------------------------------------- lifecycle
WORK=$(mktemp -d -t nbd-baselines.XXXXXX)
PIDS=()
FIO_PID=""
cleanup() {
    local rc=$? pid i
    trap - EXIT
    trap '' INT TERM    # (added) a second signal must not cut the cleanup short
    if [ -n "$FIO_PID" ]; then
        kill -TERM "$FIO_PID" 2>/dev/null || true
        wait "$FIO_PID" 2>/dev/null || true
    fi
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] || continue
        for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "nbd-baselines: interrupted" >&2; exit 130' INT
trap 'echo "nbd-baselines: terminated" >&2; exit 143' TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_nbd PID PORT LOG: wait until the server on 127.0.0.1:PORT sends the NBD
# greeting ("NBDMAGIC"), or fail if the process died / 15 s passed.
wait_nbd() {
    local pid=$1 port=$2 log=$3 i
    for i in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; die "server (pid $pid) exited during start-up"; }
        if python3 - "$port" 2>/dev/null <<'EOF'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
sys.exit(0 if s.recv(8) == b"NBDMAGIC" else 1)
EOF
        then return 0; fi
        sleep 0.1
    done
    cat "$log" >&2; die "server on port $port not ready after 15 s"
}

SERVER_NAMES=()
SERVER_URIS=()

start_nbdkit() {
    local img=$WORK/nbdkit.img port log=$WORK/nbdkit.log
    truncate -s "$IMG_SIZE" "$img"
    port=$(free_port)
    nbdkit --foreground --exit-with-parent --ipaddr 127.0.0.1 --port "$port" \
        --threads 32 file file="$img" >"$log" 2>&1 &
    PIDS+=($!)
    wait_nbd "$!" "$port" "$log"
    SERVER_NAMES+=(nbdkit); SERVER_URIS+=("nbd://127.0.0.1:$port/")
    echo "started nbdkit   pid $! on 127.0.0.1:$port" >&2
}

start_qemu_nbd() {
    local img=$WORK/qemu-nbd.img port log=$WORK/qemu-nbd.log
    truncate -s "$IMG_SIZE" "$img"
    port=$(free_port)
    qemu-nbd --format=raw --bind=127.0.0.1 --port="$port" --persistent --shared=0 \
        --cache=writeback --aio=threads --discard=unmap "$img" >"$log" 2>&1 &
    PIDS+=($!)
    wait_nbd "$!" "$port" "$log"
    SERVER_NAMES+=(qemu-nbd); SERVER_URIS+=("nbd://127.0.0.1:$port/")
    echo "started qemu-nbd pid $! on 127.0.0.1:$port" >&2
}

# render JOB: copy the job file with [global] runtime/ramp_time replaced.
render() {
    awk -v rt="${RUNTIME}s" -v rp="${RAMP}s" '
        /^\[/ { g = ($0 == "[global]") }
        g && /^runtime=/   { $0 = "runtime=" rt }
        g && /^ramp_time=/ { $0 = "ramp_time=" rp }
        { print }' "$BENCH_DIR/$1.fio" >"$WORK/$1.fio"
}

# counted NAME: is NAME in the -w list?
counted() { case ",$COUNT_WRITES," in *",$1,"*) return 0 ;; esac; return 1; }

# render_counted JOB URI OUT: the rendered job file plus, in [global], an exec_postrun that
# records the server side of the job's own NBD connection (ss -ti: bytes_received). fio runs
# exec_postrun after the job's I/O is done and before the engine closes the connection, and writes
# its output to JOBNAME.postrun.txt in its working directory.
render_counted() {
    local port
    port=$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(p.port if p.scheme == "nbd" and p.port else "")' "$2")
    [ -n "$port" ] || die "-w needs an nbd://HOST:PORT/ URI, not $2"
    awk -v cmd="exec_postrun=ss -tinH state established sport = :$port" '
        { print } $0 == "[global]" { print cmd }' "$WORK/$1.fio" >"$3"
}

# written_bytes RUNDIR: bytes written by the run's jobs, ramp included, from the postrun files.
# Client-to-server bytes of a connection = handshake + per request (28-byte header + payload), so
# for a job with one write size BS the number of writes is bytes_received // (28 + BS). Jobs
# without writes count 0. If a file shows several connections, the busiest is the job's.
written_bytes() {
    python3 - "$1" <<'PYEOF'
import json, os, re, sys
import glob
rundir = sys.argv[1]
jobs = []
for path in sorted(glob.glob(os.path.join(rundir, "fio.*.json"))):
    text = open(path).read()
    jobs += json.loads(text[text.index("{"):])["jobs"]
def size(v):
    m = re.fullmatch(r"(\d+)([kmgKMG]?)(i?[bB])?", str(v))
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
total = 0
for job in jobs:
    opts, name = job.get("job options", {}), job["jobname"]
    if "write" not in opts.get("rw", ""):
        continue
    bs = size(opts.get("bs", "4k"))
    with open(os.path.join(rundir, name + ".postrun.txt")) as f:
        got = [int(x) for x in re.findall(r"bytes_received:(\d+)", f.read())]
    if not got:
        sys.exit("no connection found in %s.postrun.txt" % name)
    total += max(got) // (28 + bs) * bs
print(total)
PYEOF
}

# sections_of JOBFILE: the job sections of a fio job file, in order (not [global]).
sections_of() { sed -n 's/^\[\(.*\)\][[:space:]]*$/\1/p' "$1" | grep -vx global; }

# run_hook PHASE JOB NAME URI RUNDIR
run_hook() {
    [ -n "$HOOK" ] || return 0
    local rc=0
    $HOOK "$@" || rc=$?
    [ "$rc" -ne 99 ] || die "hook '$HOOK $*' stopped the run (status 99)"
    [ "$rc" -eq 0 ] || echo "nbd-baselines: hook '$HOOK $*' failed (status $rc); going on" >&2
}

# ---------------------------------------------------------------- main
start_nbdkit
start_qemu_nbd
for i in "${!EXTRA_NAMES[@]}"; do
    SERVER_NAMES+=("${EXTRA_NAMES[$i]}"); SERVER_URIS+=("${EXTRA_URIS[$i]}")
done

{
    echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC')  $(nproc) CPUs  load: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# $(fio --version), $(nbdkit --version), $(qemu-nbd --version | head -1)"
    echo "# runtime ${RUNTIME}s + ramp ${RAMP}s per job and server"
} >"$WORK/header"

MANIFEST=$WORK/manifest
: >"$MANIFEST"
FAILED=0
mkdir -p "$WORK/json"
for job in "${JOB_LIST[@]}"; do
    render "$job"
    for i in "${!SERVER_NAMES[@]}"; do
        name=${SERVER_NAMES[$i]}; uri=${SERVER_URIS[$i]}
        out=$WORK/json/$job.$name.json
        rundir=$WORK/run/$job.$name
        mkdir -p "$rundir"
        jobfile=$WORK/$job.fio
        if counted "$name"; then
            jobfile=$rundir/job.fio
            render_counted "$job" "$uri" "$jobfile"
        fi
        run_hook before "$job" "$name" "$uri" "$rundir"
        echo "running $job against $name ($uri)" >&2
        # With a hook, a job file's sections run one fio process each, with the hook's `drain`
        # phase in between: randread-4k-qd32's unmeasured prefill leaves an async replica a
        # backlog that would otherwise be drained while the reads are measured. Each fio job
        # has its own NBD connection either way; the table uses the last section's result.
        sections=("")
        [ -n "$HOOK" ] && mapfile -t sections < <(sections_of "$jobfile")
        rc=0
        for k in "${!sections[@]}"; do
            sec=${sections[$k]}
            if [ "$k" -gt 0 ]; then run_hook drain "$job" "$name" "$uri" "$rundir"; fi
            # fio runs in the background and we `wait` for it: a trapped signal
            # interrupts `wait` at once (bash would otherwise skip the INT trap
            # because fio catches SIGINT and exits normally). It runs in RUNDIR,
            # where exec_postrun writes its files.
            (cd "$rundir" && NBD_URI=$uri exec fio --output-format=json --output="$rundir/fio.$k.json" \
                ${sec:+"--section=$sec"} "$jobfile") >>"$WORK/fio.$job.$name.log" 2>&1 &
            FIO_PID=$!
            wait "$FIO_PID" || rc=$?
            FIO_PID=""
            [ "$rc" -eq 0 ] || break
        done
        cp "$rundir/fio.$k.json" "$out" 2>/dev/null || true
        if [ "$rc" -eq 0 ] && counted "$name"; then
            written_bytes "$rundir" >"$rundir/written" || rm -f "$rundir/written"
        fi
        run_hook after "$job" "$name" "$uri" "$rundir"
        if [ "$rc" -eq 0 ]; then
            printf '%s\t%s\t%s\n' "$job" "$name" "$out" >>"$MANIFEST"
        else
            echo "fio failed for $job on $name:" >&2
            tail -n 5 "$WORK/fio.$job.$name.log" >&2
            printf '%s\t%s\t%s\n' "$job" "$name" "-" >>"$MANIFEST"
            FAILED=1
        fi
    done
done

if [ -n "$KEEP_JSON" ]; then
    mkdir -p "$KEEP_JSON"
    cp "$WORK"/json/*.json "$KEEP_JSON"/ 2>/dev/null || true
fi

cat "$WORK/header"
python3 - "$MANIFEST" "$MARKDOWN" <<'EOF'
import json, sys

manifest, markdown = sys.argv[1], sys.argv[2] == "1"

def stats(path):
    """Measured figures of one fio JSON result: the LAST job entry of the file
    (randread-4k-qd32.fio has an unmeasured prefill job first)."""
    with open(path) as f:
        text = f.read()
    # fio may print notes before the JSON object; start at the first '{'.
    data = json.loads(text[text.index("{"):])
    job = data["jobs"][-1]
    if job.get("error"):
        raise RuntimeError("fio error %s" % job["error"])
    iops = bw = 0.0
    clat_mean = clat_p99 = lat_mean = None
    # Count whichever directions did I/O (a job is read-only or write-only here).
    for d in ("read", "write"):
        s = job[d]
        if not s["io_bytes"]:
            continue
        iops += s["iops"]
        bw += s["bw_bytes"]
        clat_mean = s["clat_ns"]["mean"]
        clat_p99 = s["clat_ns"].get("percentile", {}).get("99.000000")
        lat_mean = s["lat_ns"]["mean"]
    return dict(iops=iops, mbs=bw / 1e6, clat_mean=clat_mean,
                clat_p99=clat_p99, lat_mean=lat_mean)

rows, base = [], {}
for line in open(manifest):
    job, server, path = line.rstrip("\n").split("\t")
    try:
        st = stats(path) if path != "-" else None
    except Exception as e:  # keep going, show the row as failed
        print("cannot parse %s: %s" % (path, e), file=sys.stderr)
        st = None
    rows.append((job, server, st))
    if server == "nbdkit" and st:
        base[job] = st["iops"]

def us(ns):
    return "-" if ns is None else ("%.0f" % (ns / 1e3) if ns >= 1e6 else "%.1f" % (ns / 1e3))

head = ["job", "server", "IOPS", "MB/s", "clat mean us", "clat p99 us",
        "lat mean us", "vs nbdkit"]
table = []
for job, server, st in rows:
    if st is None:
        table.append([job, server, "FAILED", "-", "-", "-", "-", "-"])
        continue
    ratio = "%.2fx" % (st["iops"] / base[job]) if base.get(job) else "-"
    table.append([job, server, "{:,.0f}".format(st["iops"]), "%.1f" % st["mbs"],
                  us(st["clat_mean"]), us(st["clat_p99"]), us(st["lat_mean"]), ratio])

if markdown:
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    for r in table:
        print("| " + " | ".join(r) + " |")
else:
    w = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    fmt = lambda r: "  ".join(str(x).ljust(w[i]) if i < 2 else str(x).rjust(w[i])
                              for i, x in enumerate(r))
    print(fmt(head))
    print("  ".join("-" * x for x in w))
    prev = None
    for r in table:
        if prev is not None and r[0] != prev:
            print()
        prev = r[0]
        print(fmt(r))
print()
print("IOPS/MB/s: fio's measured averages (MB = 10^6 bytes). clat: completion "
      "latency (request sent -> reply); lat: submission + completion. "
      "'vs nbdkit' = IOPS / nbdkit IOPS for the same job (higher is faster).")
EOF
exit "$FAILED"
