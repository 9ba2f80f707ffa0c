#!/usr/bin/env python3
"""xDS at scale (issue 36, must-show 5): 1,000 endpoints across 50 clusters from EDS, their
weights changed 10 times a second for a minute, while wrk runs rr-keepalive through l4lb;
against the same run with no updates, in alternating rounds.

Everything runs inside one network namespace of its own (loopback only): nginx answering on
every 127.0.x.y:8080 address (the endpoints), the tests' xDS management server
(Tests/EndToEndTests/Support/xds_server.py, grpcio + xds-protos), l4lb with an `xds:` section
and one listener per cluster, and wrk against the first listener. Reported per round:
requests per second, wrk's socket errors and non-2xx answers, the EDS updates l4lb accepted
(each a new snapshot), and l4lb's CPU seconds. Bounded: rounds x duration, then everything is
stopped and the namespace deleted.

Usage: bench/xds_scale.py [--rounds N] [--duration S] [--rate R] [--l4lb PATH]
"""
import argparse
import atexit
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NS = "l4lb-xds-bench"
CLUSTERS = 50
PER_CLUSTER = 20
ENDPOINT_PORT = 8080
XDS_PORT, CONTROL_PORT, ADMIN_PORT, LISTEN_BASE = 18000, 18001, 9901, 9000
CLK_TCK = os.sysconf("SC_CLK_TCK")
children = []


def ns(*argv, **kw):
    return ["ip", "netns", "exec", NS, *argv]


def start(argv, log):
    p = subprocess.Popen(ns(*argv), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    children.append(p)
    return p


def cleanup():
    for p in children:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def http(port, method, path, body=None):
    # Inside the namespace: through `ip netns exec curl`.
    argv = ns("curl", "-s", "-X", method, f"http://127.0.0.1:{port}{path}")
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    return json.loads(out) if out else None


def wait(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if cond():
                return
        except Exception:
            pass
        time.sleep(0.2)
    sys.exit(f"timed out waiting for {what}")


def state(version):
    clusters, assignments = [], []
    for c in range(CLUSTERS):
        name = f"c{c}"
        clusters.append({"name": name, "type": "EDS", "lbPolicy": "ROUND_ROBIN", "connectTimeout": "1s",
                         "edsClusterConfig": {"serviceName": name, "edsConfig": {"ads": {}}}})
        assignments.append({"clusterName": name, "endpoints": [{"lbEndpoints": [
            {"endpoint": {"address": {"socketAddress": {"address": f"127.0.{c + 1}.{e + 1}", "portValue": ENDPOINT_PORT}}},
             "loadBalancingWeight": 1, "healthStatus": "HEALTHY"} for e in range(PER_CLUSTER)]}]})
    return {"version": version, "clusters": clusters, "assignments": assignments}


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wrk(duration, port):
    out = subprocess.run(ns("wrk", "--latency", "-t2", "-c50", f"-d{duration}s", f"http://127.0.0.1:{port}/"),
                         capture_output=True, text=True, timeout=duration + 60).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(m.group(1)) if m else 0
    latency = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out)
    p99 = re.search(r"99%\s+(\S+)", out)
    print(f"    wrk: max latency {latency.group(1) if latency else '?'}, p99 {p99.group(1) if p99 else '?'}", flush=True)
    return rate, errors, non2xx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=int, default=60)
    ap.add_argument("--rate", type=int, default=10)
    ap.add_argument("--l4lb", default=str(ROOT / ".build/release/l4lb"))
    args = ap.parse_args()
    atexit.register(cleanup)
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    subprocess.run(ns("ip", "link", "set", "lo", "up"), check=True)
    work = Path(tempfile.mkdtemp(prefix="l4lb-xds-bench-"))

    # nginx on every 127.x address of the namespace (0.0.0.0 inside it is loopback only).
    (work / "nginx.conf").write_text(f"""
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server {{ listen {ENDPOINT_PORT} reuseport backlog=4096; location / {{ return 200 "ok\\n"; }} }}
}}
""")
    start(["nginx", "-c", str(work / "nginx.conf"), "-g", "daemon off;"], work / "nginx.out")
    (work / "state.json").write_text(json.dumps(state("v0")))
    server = start([sys.executable, str(ROOT / "Tests/EndToEndTests/Support/xds_server.py"), "--port", str(XDS_PORT),
           "--control-port", str(CONTROL_PORT), "--state", str(work / "state.json")], work / "xds.out")
    wait(lambda: http(CONTROL_PORT, "GET", "/ready"), 30, "the xDS server")
    listeners = "\n".join(f"  - {{ name: l{c}, address: 127.0.0.1:{LISTEN_BASE + c}, cluster: c{c} }}" for c in range(CLUSTERS))
    (work / "l4lb.yaml").write_text(f"""
admin: {{ address: 127.0.0.1:{ADMIN_PORT} }}
xds: {{ server: 127.0.0.1:{XDS_PORT}, node_id: bench }}
listeners:
{listeners}
""")
    l4lb = start([args.l4lb, "run", "--config", str(work / "l4lb.yaml")], work / "l4lb.log")

    def eds():
        return http(ADMIN_PORT, "GET", "/discovery")["xds"]["endpoints"]
    wait(lambda: eds()["version"] == "v0" and eds()["resources"] == CLUSTERS, 60, "l4lb to take the 50 clusters")
    endpoints = sum(len(c["endpoints"]) for c in http(ADMIN_PORT, "GET", "/stats")["clusters"])
    print(f"l4lb took {CLUSTERS} clusters, {endpoints} endpoints from EDS", flush=True)
    wrk(3, LISTEN_BASE)  # warm-up

    rows = []
    server_cpu = cpu_seconds(server.pid)
    for r in range(args.rounds):
        for kind in ("quiet", "updates"):
            before = eds()["accepted"]
            generation = http(ADMIN_PORT, "GET", "/stats")["generation"]
            cpu = cpu_seconds(l4lb.pid)
            if kind == "updates":
                http(CONTROL_PORT, "POST", "/churn", {"rate": args.rate, "seconds": args.duration})
            rate, errors, non2xx = wrk(args.duration, LISTEN_BASE)
            if kind == "updates":
                time.sleep(1)
            accepted = eds()["accepted"] - before
            generations = http(ADMIN_PORT, "GET", "/stats")["generation"] - generation
            used = cpu_seconds(l4lb.pid) - cpu
            server_used = cpu_seconds(server.pid) - server_cpu
            server_cpu = cpu_seconds(server.pid)
            rows.append((r + 1, kind, rate, errors, non2xx, accepted, generations, used))
            print(f"round {r + 1} {kind:8s} {rate:10.0f} req/s  errors {errors}  non-2xx {non2xx}  "
                  f"EDS updates accepted {accepted}  snapshots {generations}  l4lb CPU {used:.1f} s  "
                  f"xDS server CPU {server_used:.1f} s", flush=True)
    quiet = [row[2] for row in rows if row[1] == "quiet"]
    busy = [row[2] for row in rows if row[1] == "updates"]
    print(f"\nquiet:   {', '.join(f'{x:.0f}' for x in quiet)} req/s (median {statistics.median(quiet):.0f}, spread {min(quiet):.0f}-{max(quiet):.0f})")
    print(f"updates: {', '.join(f'{x:.0f}' for x in busy)} req/s (median {statistics.median(busy):.0f}); "
          f"ratio of medians {statistics.median(busy) / statistics.median(quiet):.3f}")
    rejected = eds()["rejected"]
    print(f"EDS responses rejected (NACK): {rejected}; wrk errors in all rounds: {sum(row[3] + row[4] for row in rows)}")


if __name__ == "__main__":
    main()
