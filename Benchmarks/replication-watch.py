#!/usr/bin/env python3
"""Benchmarks/replication-watch.py -- reads `ferry status --json` for the replication benchmarks
(Benchmarks/replication.sh, Benchmarks/sync-rates.sh). Python 3 standard library only.

    Wherever a config is asked for, `socket:PATH` reads the admin socket directly instead of
    running `ferry status --json` (the same JSON; much cheaper to poll several times a second).

    replication-watch.py wait  --config EAST.yaml [--drained] [--timeout S] [--progress S]
                                       [--interval S] [--trace FILE]
        Wait until every replica of every volume the site is primary of is `in-sync` and
        consistent (with --drained also lagBytes, inFlightBytes and dirtyBytes 0). Prints the
        seconds it took. Exit 1 on timeout, with the last status on stderr; exit 99 as soon as a
        site named in FERRY_BENCH_PIDS ("east=PID,west=PID") has exited. --trace appends each
        poll ({"t": unix time, "replicas": {...}}) to a file.

    replication-watch.py poll  --config EAST.yaml --out SAMPLES.jsonl [--interval 1]
        Until SIGTERM/SIGINT: once per interval, append one JSON line
        {"t": unix time, "replicas": {"VOLUME/PEER": {state, lagBytes, lagSeconds, ...}}}.

    replication-watch.py hook  before|drain|after JOB SERVER URI RUNDIR
        The -H hook of Benchmarks/nbd-baselines.sh. Environment: FERRY_BIN, FERRY_BENCH_CONFIG
        (east's config), FERRY_BENCH_STATE (a directory), FERRY_BENCH_VOLUMES
        ("server=volume,..."; servers not listed only get the drain wait). `before` notes the
        volume's bytesSent; `drain` (between the sections of one job file, e.g. after the
        randread prefill) and `after` wait until every replica is drained (so an async backlog
        does not run into what is measured next; FERRY_BENCH_DRAIN_TIMEOUT, default 900 s);
        Exit 99 (nbd-baselines.sh then stops the run) when a site of FERRY_BENCH_PIDS exited.
        `after` then appends
        {job, server, volume, written, sent, drain seconds, max lag seen} to
        STATE/records.jsonl.

    replication-watch.py summary --state DIR --samples SAMPLES.jsonl
        The per-row table of what replication.sh's hook recorded, plus the max lag per volume
        over the whole run from the 1 s samples.

    replication-watch.py get   --config EAST.yaml VOLUME [PEER]
        Print the replica's status entry as one JSON line.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time


def ferry_bin():
    return os.environ.get("FERRY_BIN", "ferry")


def status(config, timeout=15):
    """The site's status: `ferry status --json --config CONFIG`, or, when CONFIG is given as
    `socket:PATH`, the same JSON straight from the admin socket (GET /v1/status), which costs far
    less CPU than starting the CLI -- used where status is polled several times a second."""
    if config.startswith("socket:"):
        return admin_status(config[len("socket:"):], timeout)
    r = subprocess.run([ferry_bin(), "status", "--json", "--config", config],
                       capture_output=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError("ferry status: " + r.stderr.decode(errors="replace").strip())
    return json.loads(r.stdout)


def admin_status(path, timeout):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: ferry\r\nContent-Length: 0\r\n"
                  b"Connection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    code = head.split(b"\r\n", 1)[0].split(b" ")[1:2]
    if code != [b"200"]:
        raise RuntimeError("admin socket answered %r" % head[:80])
    return json.loads(body)


def replicas(st):
    """{"volume/peer": replica entry} for every volume this site is primary of."""
    out = {}
    for v in st.get("volumes", []):
        if v.get("role") != "primary":
            continue
        for r in v.get("replicas", []):
            out[v["name"] + "/" + r["peer"]] = r
    return out


def settled(r, drained):
    if r.get("state") != "in-sync" or not r.get("consistent"):
        return False
    if drained and (r.get("lagBytes") or r.get("inFlightBytes") or r.get("dirtyBytes")):
        return False
    return True


class SiteDied(Exception):
    pass


def dead_sites():
    """Sites named in FERRY_BENCH_PIDS ("east=PID,west=PID") that are gone (or zombies)."""
    gone = []
    for item in os.environ.get("FERRY_BENCH_PIDS", "").split(","):
        if "=" not in item:
            continue
        name, pid = item.split("=", 1)
        try:
            with open("/proc/%d/stat" % int(pid)) as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    gone.append("%s (pid %s)" % (name, pid))
        except (OSError, ValueError):
            gone.append("%s (pid %s)" % (name, pid))
    return gone


def wait(config, drained, timeout, interval=0.2, on_sample=None, progress=0, trace=None):
    """Seconds until every replica is settled; raises TimeoutError (with the last view), or
    SiteDied when a site of FERRY_BENCH_PIDS is gone. With progress > 0, prints a line on stderr
    every `progress` seconds."""
    t0 = time.monotonic()
    shown = t0
    last = None
    while True:
        gone = dead_sites()
        if gone:
            raise SiteDied(", ".join(gone) + " exited")
        try:
            last = replicas(status(config))
            if on_sample:
                on_sample(last)
            if trace:
                trace.write(json.dumps({"t": time.time(), "replicas": {
                    k: {x: r.get(x) for x in KEEP} for k, r in last.items()}}) + "\n")
                trace.flush()
            if progress and time.monotonic() - shown >= progress:
                shown = time.monotonic()
                print("  %4.0f s: " % (shown - t0) + ", ".join(
                    "%s %s%s" % (k, r.get("state"), "" if r.get("syncRemainingBytes") is None
                                 else " (%s MiB left)" % mib(r["syncRemainingBytes"]))
                    for k, r in sorted(last.items())), file=sys.stderr)
            if all(settled(r, drained) for r in last.values()):
                return time.monotonic() - t0
        except (RuntimeError, OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
            last = {"error": str(e)}
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(json.dumps(last, indent=1, sort_keys=True))
        time.sleep(interval)


KEEP = ("state", "consistent", "connected", "lagBytes", "lagSeconds", "dirtyBytes",
        "inFlightBytes", "bytesSent", "syncRemainingBytes", "syncTotalBytes")


def cmd_wait(a):
    try:
        trace = open(a.trace, "a") if a.trace else None
        print("%.2f" % wait(a.config, a.drained, a.timeout, interval=a.interval,
                            progress=a.progress, trace=trace))
    except SiteDied as e:
        print("replication-watch: %s; see its log" % e, file=sys.stderr)
        return 99
    except TimeoutError as e:
        print("replication-watch: replicas not %s after %.0f s:\n%s"
              % ("drained" if a.drained else "in sync", a.timeout, e), file=sys.stderr)
        return 1
    return 0


def cmd_poll(a):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    with open(a.out, "a") as f:
        while not stop:
            t = time.time()
            try:
                reps = replicas(status(a.config, timeout=max(5, a.interval * 5)))
                f.write(json.dumps({"t": t, "replicas": {k: {x: r.get(x) for x in KEEP}
                                                         for k, r in reps.items()}}) + "\n")
                f.flush()
            except Exception as e:  # noqa: BLE001 -- a missed sample is not fatal
                print("replication-watch poll: %s" % e, file=sys.stderr)
            left = a.interval - (time.time() - t)
            while left > 0 and not stop:
                time.sleep(min(left, 0.1))
                left = a.interval - (time.time() - t)
    return 0


def sent_of(reps, volume):
    return sum(r.get("bytesSent", 0) for k, r in reps.items() if k.split("/")[0] == volume)


def cmd_hook(a):
    config = os.environ["FERRY_BENCH_CONFIG"]  # may be socket:PATH
    state = os.environ["FERRY_BENCH_STATE"]
    vols = dict(x.split("=", 1) for x in os.environ.get("FERRY_BENCH_VOLUMES", "").split(",") if "=" in x)
    volume = vols.get(a.server)
    mark = os.path.join(a.rundir, "hook-before.json")
    if a.phase == "before":
        # Nothing may be pending before a row starts (the previous after-hook waited).
        try:
            wait(config, True, float(os.environ.get("FERRY_BENCH_DRAIN_TIMEOUT", "900")))
        except SiteDied as e:
            print("replication-watch: %s; stopping the run" % e, file=sys.stderr)
            return 99
        reps = replicas(status(config))
        with open(mark, "w") as f:
            json.dump({"t": time.time(), "sent": sent_of(reps, volume) if volume else 0}, f)
        return 0
    t_end = time.time()
    peak_file = os.path.join(a.rundir, "hook-peak.json")
    try:
        peak = json.load(open(peak_file))
    except (OSError, ValueError):
        peak = {"lagBytes": 0, "lagSeconds": 0.0}

    def note(reps):
        for k, r in reps.items():
            if volume and k.split("/")[0] == volume:
                peak["lagBytes"] = max(peak["lagBytes"], r.get("lagBytes") or 0)
                peak["lagSeconds"] = max(peak["lagSeconds"], r.get("lagSeconds") or 0.0)

    timeout = float(os.environ.get("FERRY_BENCH_DRAIN_TIMEOUT", "900"))
    try:
        drain = wait(config, True, timeout, on_sample=note)
    except SiteDied as e:
        print("replication-watch: after %s on %s: %s; stopping the run" % (a.job, a.server, e),
              file=sys.stderr)
        return 99
    except TimeoutError as e:
        print("replication-watch: after %s on %s, replicas not drained in %.0f s:\n%s"
              % (a.job, a.server, timeout, e), file=sys.stderr)
        drain = None
    if a.phase == "drain":   # between two sections of one job file: note the peak, go on
        with open(peak_file, "w") as f:
            json.dump(peak, f)
        return 0 if drain is not None else 1
    if not volume:
        return 0 if drain is not None else 1
    before = json.load(open(mark))
    reps = replicas(status(config))
    written = None
    try:
        written = int(open(os.path.join(a.rundir, "written")).read())
    except (OSError, ValueError):
        pass
    rec = {"job": a.job, "server": a.server, "volume": volume, "t_start": before["t"],
           "t_end": t_end, "drain": drain, "written": written,
           "sent": sent_of(reps, volume) - before["sent"],
           "hookMaxLagBytes": peak["lagBytes"], "hookMaxLagSeconds": peak["lagSeconds"]}
    with open(os.path.join(state, "records.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    return 0 if drain is not None else 1


def mib(n):
    return "-" if n is None else "%.1f" % (n / 1048576)


def cmd_summary(a):
    samples = []
    try:
        for line in open(a.samples):
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    except OSError:
        pass
    recs = []
    try:
        recs = [json.loads(line) for line in open(os.path.join(a.state, "records.jsonl"))]
    except OSError:
        pass

    def peak(volume, t0, t1):
        lb, ls = 0, 0.0
        for s in samples:
            if t0 <= s["t"] <= t1:
                for k, r in s["replicas"].items():
                    if k.split("/")[0] == volume:
                        lb = max(lb, r.get("lagBytes") or 0)
                        ls = max(ls, r.get("lagSeconds") or 0.0)
        return lb, ls

    head = ["job", "server", "written MiB", "sent MiB", "sent/written", "max lag MiB",
            "max lag s", "drain s"]
    rows, tot = [], {}
    for r in recs:
        t1 = r["t_end"] + (r["drain"] or 0)
        lb, ls = peak(r["volume"], r["t_start"], t1)
        lb, ls = max(lb, r["hookMaxLagBytes"]), max(ls, r["hookMaxLagSeconds"])
        ratio = "%.3f" % (r["sent"] / r["written"]) if r.get("written") else "-"
        rows.append([r["job"], r["server"], mib(r["written"]), mib(r["sent"]), ratio, mib(lb),
                     "%.1f" % ls, "-" if r["drain"] is None else "%.1f" % r["drain"]])
        t = tot.setdefault(r["server"], {"w": 0, "s": 0, "lb": 0, "ls": 0.0, "ok": True})
        t["w"] += r["written"] or 0
        t["s"] += r["sent"]
        t["ok"] &= r["written"] is not None
        t["lb"], t["ls"] = max(t["lb"], lb), max(t["ls"], ls)
    for server, t in tot.items():
        rows.append(["all jobs", server, mib(t["w"]) if t["ok"] else "-", mib(t["s"]),
                     "%.3f" % (t["s"] / t["w"]) if t["ok"] and t["w"] else "-",
                     mib(t["lb"]), "%.1f" % t["ls"], ""])
    if rows:
        if a.markdown:
            print("| " + " | ".join(head) + " |")
            print("|---|---|" + "---:|" * (len(head) - 2))
            for r in rows:
                print("| " + " | ".join(r) + " |")
        else:
            w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
            fmt = lambda r: "  ".join(str(x).ljust(w[i]) if i < 2 else str(x).rjust(w[i])
                                      for i, x in enumerate(r))
            print(fmt(head))
            print("  ".join("-" * x for x in w))
            for r in rows:
                print(fmt(r))
    # Whole run, from the 1 s samples.
    allmax = {}
    for s in samples:
        for k, r in s["replicas"].items():
            m = allmax.setdefault(k, [0, 0.0])
            m[0] = max(m[0], r.get("lagBytes") or 0)
            m[1] = max(m[1], r.get("lagSeconds") or 0.0)
    if allmax:
        print()
        print("max lag over the whole run (%d samples, 1 s apart): " % len(samples)
              + ", ".join("%s %s MiB / %.1f s" % (k, mib(v[0]), v[1]) for k, v in sorted(allmax.items())))
    return 0


def cmd_get(a):
    reps = replicas(status(a.config))
    for k, r in reps.items():
        vol, peer = k.split("/", 1)
        if vol == a.volume and (a.peer is None or peer == a.peer):
            print(json.dumps(r, sort_keys=True))
            return 0
    print("replication-watch: no replica of %s%s" % (a.volume, "" if a.peer is None else " on " + a.peer),
          file=sys.stderr)
    return 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("wait")
    p.add_argument("--config", required=True)
    p.add_argument("--drained", action="store_true")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--progress", type=float, default=0, help="print progress every N seconds")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between polls")
    p.add_argument("--trace", help="append every poll to this JSON-lines file")
    p = sub.add_parser("poll")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=1.0)
    p = sub.add_parser("hook")
    p.add_argument("phase", choices=["before", "drain", "after"])
    p.add_argument("job")
    p.add_argument("server")
    p.add_argument("uri")
    p.add_argument("rundir")
    p = sub.add_parser("summary")
    p.add_argument("--state", required=True)
    p.add_argument("--samples", required=True)
    p.add_argument("-m", "--markdown", action="store_true")
    p = sub.add_parser("get")
    p.add_argument("--config", required=True)
    p.add_argument("volume")
    p.add_argument("peer", nargs="?")
    a = ap.parse_args()
    return {"wait": cmd_wait, "poll": cmd_poll, "hook": cmd_hook, "summary": cmd_summary,
            "get": cmd_get}[a.cmd](a)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
