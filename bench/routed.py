#!/usr/bin/env python3
"""Kernel forwarding, first measurement (issue 35, plan step 6): a routed three-namespace
topology over veth (clients 198.51.100.0/24, l4lb's namespace in the middle, an nginx and an
iperf3 endpoint at 203.0.113.2), and wrk keep-alive (rr), Connection: close (conn) and an
iperf3 upload (bulk) against:

  direct      the endpoint, routed through the middle namespace (no balancer, no nftables)
  nft         nftables DNAT + SNAT in the middle namespace (kube-proxy's nftables mode)
  l4lb-kernel a tcp listener with relay: kernel
  l4lb-proxy  a tcp listener of the same l4lb (relay: user)
  haproxy     HAProxy in mode tcp
  nginx       nginx's stream module (proxy_pass)

Figures are machine CPU per request (/proc/stat busy time: user + nice + system + irq +
softirq, all namespaces) and requests per second, medians over paired rounds; "overhead" is
CPU per request minus direct's. For bulk a "request" is a GB and the rate is Gbit/s; for
udp-dns a query answered (dnsperf to nsd); for udp-64x1 and udp-64x1000 a 64-byte datagram
delivered to a counting sink, sent from 1 or 1,000 source ports at --pps-rate a second
(bench/udp_blast.c, compiled at start). Every run is bounded (rounds × duration) and the
topology is deleted on exit. Usage: bench/routed.py [--rounds N] [--duration S]
[--only WORKLOAD] [--pps-rate N] [--l4lb PATH]
"""
import argparse
import atexit
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import write_nsd  # noqa: E402  (the same nsd zone and query file as scripts/bench)

CLK_TCK = os.sysconf("SC_CLK_TCK")
NS = {"c": "l4lb-rb-c", "l": "l4lb-rb-l", "e": "l4lb-rb-e"}
ENDPOINT = "203.0.113.2"
PORTS = {"direct": None, "nft": 80, "l4lb-kernel": 81, "l4lb-proxy": 82, "haproxy": 83, "nginx": 84}
BULK = 100  # bulk's listener ports are PORTS + BULK, to iperf3 on the endpoint's 5201
DNS = 200   # udp-dns's listener ports are PORTS + DNS, to nsd on the endpoint's 53 (HAProxy has no UDP)
DNS_NAMES = 1000
PPS = 300   # udp-64's listener ports are PORTS + PPS, to udp_blast's sink on the endpoint's 9000
PPS_RATE = 100_000  # datagrams a second offered, over all flows (--pps-rate): what l4lb and nftables carry whole


def sh(*argv, check=True, ns=None, **kw):
    if ns:
        argv = ("ip", "netns", "exec", NS[ns]) + argv
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


def machine_busy_seconds():
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


def l4lb_cpu_seconds():
    """CPU of the l4lb process (all threads: workers, admin, the forwarder's sync/sweep)."""
    out = subprocess.run(["pgrep", "-f", "l4lb run --config"], capture_output=True, text=True).stdout.split()
    total = 0.0
    for pid in out:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            pass
    return total


def topology_up():
    topology_down()
    for name in NS.values():
        sh("ip", "netns", "add", name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
    sh("ip", "-n", NS["c"], "link", "add", "l4c", "type", "veth", "peer", "name", "l4b-c", "netns", NS["l"])
    sh("ip", "-n", NS["e"], "link", "add", "l4e", "type", "veth", "peer", "name", "l4b-e", "netns", NS["l"])
    for ns, dev, addr in (("c", "l4c", "198.51.100.2/24"), ("l", "l4b-c", "198.51.100.1/24"),
                          ("l", "l4b-e", "203.0.113.1/24"), ("e", "l4e", f"{ENDPOINT}/24")):
        sh("ip", "-n", NS[ns], "addr", "add", addr, "dev", dev)
        sh("ip", "-n", NS[ns], "link", "set", dev, "up")
    sh("ip", "-n", NS["c"], "route", "add", "default", "via", "198.51.100.1")
    # Only "direct" needs the endpoint to reach clients; the balancers NAT to 203.0.113.1.
    sh("ip", "-n", NS["e"], "route", "add", "198.51.100.0/24", "via", "203.0.113.1")
    for key in ("net.ipv4.conf.all.forwarding", "net.ipv6.conf.all.forwarding"):
        sh("sysctl", "-qw", f"{key}=1", ns="l")
    sh("sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000", ns="c")
    # The balancer's own connections (HAProxy's, the proxy's) take ports below 10000; the
    # kernel path's NAT ports are the rest (docs/kernel-forwarding.md: choose nat_ports outside the range).
    sh("sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 9999", ns="l")


def topology_down():
    for name in NS.values():
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


NFT = f"""
table ip l4lb_bench {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr 198.51.100.1 tcp dport {PORTS['nft']} dnat to {ENDPOINT}:8080
    ip daddr 198.51.100.1 tcp dport {PORTS['nft'] + BULK} dnat to {ENDPOINT}:5201
    ip daddr 198.51.100.1 udp dport {PORTS['nft'] + DNS} dnat to {ENDPOINT}:53
    ip daddr 198.51.100.1 udp dport {PORTS['nft'] + PPS} dnat to {ENDPOINT}:9000
  }}
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    ip daddr {ENDPOINT} oifname "l4b-e" masquerade
  }}
}}
"""


def start(tmp, l4lb):
    procs = []
    (tmp / "nginx.conf").write_text(f"""
worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log stderr error;
events {{ worker_connections 65536; }}
http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 600s;
  server {{ listen {ENDPOINT}:8080 backlog=65535; location / {{ return 200 "hello world\\n"; }} }} }}
""")
    procs.append(subprocess.Popen(["ip", "netns", "exec", NS["e"], "nginx", "-c", str(tmp / "nginx.conf")]))
    procs.append(subprocess.Popen(["ip", "netns", "exec", NS["e"], "iperf3", "-s", "-B", ENDPOINT, "-p", "5201"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    write_nsd(tmp, address=f"{ENDPOINT}@53", names=DNS_NAMES)
    procs.append(subprocess.Popen(["ip", "netns", "exec", NS["e"], "/usr/sbin/nsd", "-d", "-c", str(tmp / "nsd.conf")],
                                  stdout=subprocess.DEVNULL, stderr=open(tmp / "nsd.err", "w")))
    (tmp / "l4lb.yaml").write_text(f"""
workers: 1
drain_timeout: 1s
kernel_relay: {{ interfaces: [l4b-c, l4b-e], flows: 262144, nat_ports: 10000-65535 }}
listeners:
  - {{ name: kernel, address: 198.51.100.1:{PORTS['l4lb-kernel']}, cluster: web, relay: kernel, idle_timeout: 10m }}
  - {{ name: proxy, address: 198.51.100.1:{PORTS['l4lb-proxy']}, cluster: web, idle_timeout: 10m, max_connections: 1000000 }}
  - {{ name: kernel-bulk, address: 198.51.100.1:{PORTS['l4lb-kernel'] + BULK}, cluster: bulk, relay: kernel, idle_timeout: 10m }}
  - {{ name: proxy-bulk, address: 198.51.100.1:{PORTS['l4lb-proxy'] + BULK}, cluster: bulk, idle_timeout: 10m }}
  - {{ name: kernel-dns, address: 198.51.100.1:{PORTS['l4lb-kernel'] + DNS}, protocol: udp, cluster: dns, relay: kernel }}
  - {{ name: proxy-dns, address: 198.51.100.1:{PORTS['l4lb-proxy'] + DNS}, protocol: udp, cluster: dns }}
  - {{ name: kernel-pps, address: 198.51.100.1:{PORTS['l4lb-kernel'] + PPS}, protocol: udp, cluster: sink, relay: kernel }}
  - {{ name: proxy-pps, address: 198.51.100.1:{PORTS['l4lb-proxy'] + PPS}, protocol: udp, cluster: sink }}
clusters:
  - {{ name: web, balancer: maglev, endpoints: [{{ address: {ENDPOINT}:8080 }}] }}
  - {{ name: bulk, balancer: maglev, endpoints: [{{ address: {ENDPOINT}:5201 }}] }}
  - {{ name: dns, balancer: maglev, endpoints: [{{ address: {ENDPOINT}:53 }}] }}
  - {{ name: sink, balancer: maglev, endpoints: [{{ address: {ENDPOINT}:9000 }}] }}
""")
    procs.append(subprocess.Popen(["ip", "netns", "exec", NS["l"], l4lb, "run", "--config", str(tmp / "l4lb.yaml")],
                                  stdout=subprocess.DEVNULL, stderr=open(tmp / "l4lb.log", "w")))
    (tmp / "haproxy.cfg").write_text(f"""
global
    nbthread 1
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend fe
    bind 198.51.100.1:{PORTS['haproxy']}
    default_backend be
backend be
    server s1 {ENDPOINT}:8080
frontend fe_bulk
    bind 198.51.100.1:{PORTS['haproxy'] + BULK}
    default_backend be_bulk
backend be_bulk
    server s1 {ENDPOINT}:5201
""")
    procs.append(subprocess.Popen(["ip", "netns", "exec", NS["l"], "haproxy", "-db", "-f", str(tmp / "haproxy.cfg")],
                                  stdout=subprocess.DEVNULL, stderr=open(tmp / "haproxy.log", "w")))
    (tmp / "nginx-stream.conf").write_text(f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1; daemon off; pid {tmp}/nginx-stream.pid; error_log stderr error;
events {{ worker_connections 20000; }}
stream {{
  server {{ listen 198.51.100.1:{PORTS['nginx']} backlog=65535; proxy_pass {ENDPOINT}:8080; }}
  server {{ listen 198.51.100.1:{PORTS['nginx'] + BULK}; proxy_pass {ENDPOINT}:5201; }}
  server {{ listen 198.51.100.1:{PORTS['nginx'] + DNS} udp; proxy_pass {ENDPOINT}:53; proxy_responses 1; }}
  server {{ listen 198.51.100.1:{PORTS['nginx'] + PPS} udp; proxy_pass {ENDPOINT}:9000; proxy_responses 0; }}
}}
""")
    procs.append(subprocess.Popen(["ip", "netns", "exec", NS["l"], "nginx", "-c", str(tmp / "nginx-stream.conf")],
                                  stdout=subprocess.DEVNULL, stderr=open(tmp / "nginx-stream.log", "w")))
    deadline = time.time() + 30
    for mode in PORTS:
        while time.time() < deadline:
            if sh("curl", "-s", "-m", "2", target(mode), ns="c", check=False).stdout.startswith("hello"):
                break
            if mode == "nft" and not nft_loaded():
                break  # checked when loaded
            time.sleep(0.2)
    return procs


def nft_loaded():
    return "l4lb_bench" in sh("nft", "list", "tables", ns="l", check=False).stdout


def target(mode):
    if mode == "direct":
        return f"http://{ENDPOINT}:8080/"
    return f"http://198.51.100.1:{PORTS[mode]}/"


def wrk(mode, duration, close):
    argv = ["wrk", "-t1", "-c50", f"-d{duration}s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(target(mode))
    if mode == "nft":
        sh("nft", "-f", "-", ns="l", input=NFT)
    try:
        m0, t0, p0 = machine_busy_seconds(), time.time(), l4lb_cpu_seconds()
        run = sh(*argv, ns="c", timeout=duration + 30, check=False)
        if run.returncode != 0:
            sys.exit(f"{mode}: wrk failed: {run.stdout} {run.stderr}")
        out = run.stdout
        m1, t1, p1 = machine_busy_seconds(), time.time(), l4lb_cpu_seconds()
    finally:
        if mode == "nft":
            sh("nft", "delete", "table", "ip", "l4lb_bench", ns="l", check=False)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": requests / (t1 - t0), "cpu_us": (m1 - m0) / max(requests, 1) * 1e6,
            "l4lb_us": (p1 - p0) / max(requests, 1) * 1e6, "errors": errors.group(1) if errors else ""}


def bulk(mode, duration):
    host, port = (ENDPOINT, 5201) if mode == "direct" else ("198.51.100.1", PORTS[mode] + BULK)
    if mode == "nft":
        sh("nft", "-f", "-", ns="l", input=NFT)
    try:
        m0, p0 = machine_busy_seconds(), l4lb_cpu_seconds()
        run = sh("iperf3", "-c", host, "-p", str(port), "-t", str(duration), "-J", ns="c", timeout=duration + 30, check=False)
        m1, p1 = machine_busy_seconds(), l4lb_cpu_seconds()
    finally:
        if mode == "nft":
            sh("nft", "delete", "table", "ip", "l4lb_bench", ns="l", check=False)
    if run.returncode != 0:
        sys.exit(f"{mode}: iperf3 failed: {run.stdout[-500:]} {run.stderr}")
    import json
    end = json.loads(run.stdout)["end"]
    received = end["sum_received"]["bytes"]
    gb = received / 1e9
    return {"rps": end["sum_received"]["bits_per_second"] / 1e9, "cpu_us": (m1 - m0) / max(gb, 1e-9) * 1e6,
            "l4lb_us": (p1 - p0) / max(gb, 1e-9) * 1e6, "errors": f"sent {end['sum_sent']['bytes']} received {received}"}


def modes(workload):
    """The modes a workload runs: all but HAProxy for UDP (its free edition has none)."""
    return [m for m in PORTS if not (workload.startswith("udp") and m == "haproxy")]


def udp_small(mode, duration, flows, blast, rate):
    """64-byte datagrams from `flows` source ports at `rate` a second, counted by a sink on
    the endpoint: a "request" is a datagram delivered."""
    host, port = (ENDPOINT, 9000) if mode == "direct" else ("198.51.100.1", PORTS[mode] + PPS)
    if mode == "nft":
        sh("nft", "-f", "-", ns="l", input=NFT)
    try:
        sink = subprocess.Popen(["ip", "netns", "exec", NS["e"], blast, "sink", ENDPOINT, "9000", str(duration + 1.5)],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)
        m0, p0 = machine_busy_seconds(), l4lb_cpu_seconds()
        run = sh(blast, "send", host, str(port), str(flows), str(rate), str(duration), "64", ns="c", timeout=duration + 30, check=False)
        m1, p1 = machine_busy_seconds(), l4lb_cpu_seconds()
        out, _ = sink.communicate(timeout=duration + 30)
    finally:
        if mode == "nft":
            sh("nft", "delete", "table", "ip", "l4lb_bench", ns="l", check=False)
    sent = int(re.search(r"sent (\d+)", run.stdout).group(1))
    received = int(re.search(r"received (\d+)", out).group(1))
    if not received:
        sys.exit(f"{mode}: no datagram arrived ({run.stdout} {run.stderr})")
    return {"rps": received / duration, "cpu_us": (m1 - m0) / received * 1e6, "l4lb_us": (p1 - p0) / received * 1e6,
            "errors": f"{sent - received} of {sent} lost" if sent > received else ""}


def udp_dns(mode, duration, queries):
    """dnsperf -c 20 (20 client sockets, as fast as answers come), as BENCH.md has it."""
    host, port = (ENDPOINT, 53) if mode == "direct" else ("198.51.100.1", PORTS[mode] + DNS)
    if mode == "nft":
        sh("nft", "-f", "-", ns="l", input=NFT)
    try:
        m0, p0 = machine_busy_seconds(), l4lb_cpu_seconds()
        run = sh("dnsperf", "-s", host, "-p", str(port), "-d", str(queries), "-c", "20", "-l", str(duration), "-t", "2",
                 ns="c", timeout=duration + 30, check=False)
        m1, p1 = machine_busy_seconds(), l4lb_cpu_seconds()
    finally:
        if mode == "nft":
            sh("nft", "delete", "table", "ip", "l4lb_bench", ns="l", check=False)
    completed = re.search(r"Queries completed:\s+(\d+)", run.stdout)
    if not completed or not int(completed.group(1)):
        sys.exit(f"{mode}: dnsperf failed: {run.stdout[-500:]} {run.stderr[-300:]}")
    done = int(completed.group(1))
    lost = int(re.search(r"Queries lost:\s+(\d+)", run.stdout).group(1))
    return {"rps": done / duration, "cpu_us": (m1 - m0) / done * 1e6, "l4lb_us": (p1 - p0) / done * 1e6,
            "errors": f"{lost} lost" if lost else ""}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--only", choices=["rr-keepalive", "conn-rate", "bulk", "udp-dns", "udp-64x1", "udp-64x1000"])
    parser.add_argument("--pps-rate", type=int, default=PPS_RATE, help="udp-64's offered datagrams a second")
    parser.add_argument("--l4lb", default=str(Path(__file__).resolve().parent.parent / ".build/release/l4lb"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/routed.py needs root (network namespaces)")
    tmp = Path(tempfile.mkdtemp(prefix="l4lb-routed-"))
    procs = []

    def cleanup(*_):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["pkill", "-f", f"{tmp}/nginx.conf"], capture_output=True)
        subprocess.run(["pkill", "-f", f"{tmp}/nginx-stream.conf"], capture_output=True)
        topology_down()
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(cleanup)
    atexit.register(lambda: print((tmp / "haproxy.log").read_text()[-1500:]) if (tmp / "haproxy.log").exists() else None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    topology_up()
    procs.extend(start(tmp, args.l4lb))
    results = {}
    blast = str(tmp / "udp_blast")
    sh("cc", "-O2", "-o", blast, str(Path(__file__).resolve().parent / "udp_blast.c"))
    workloads = (("rr-keepalive", False), ("conn-rate", True), ("bulk", None), ("udp-dns", None), ("udp-64x1", 1), ("udp-64x1000", 1000))
    if args.only:
        workloads = tuple(w for w in workloads if w[0] == args.only)
    for workload, close in workloads:
        for r in range(args.rounds):
            for mode in modes(workload):
                if workload == "udp-dns":
                    figures = udp_dns(mode, args.duration, tmp / "queries.txt")
                elif workload.startswith("udp-64"):
                    figures = udp_small(mode, args.duration, close, blast, args.pps_rate)
                else:
                    figures = bulk(mode, args.duration) if workload == "bulk" else wrk(mode, args.duration, close)
                results.setdefault((workload, mode), []).append(figures)
                print(f"{workload} round {r + 1} {mode}: {figures['rps']:.2f} {'Gbit/s' if workload == 'bulk' else 'req/s'}, {figures['cpu_us']:.2f} µs machine CPU/req, "
                      f"l4lb process {figures['l4lb_us']:.2f} µs/req {figures['errors']}",
                      flush=True)
    print("\n| workload | mode | req/s | machine CPU µs/req | overhead µs/req (− direct) | × HAProxy's overhead (udp-dns: nginx's) | × nftables' CPU |")
    print("|---|---|---|---|---|---|---|")
    for workload, _ in workloads:
        med = {mode: {k: statistics.median(f[k] for f in results[(workload, mode)]) for k in ("rps", "cpu_us")} for mode in modes(workload)}
        base = med["direct"]["cpu_us"]
        ha = med["haproxy" if "haproxy" in med else "nginx"]["cpu_us"] - base
        for mode in modes(workload):
            over = med[mode]["cpu_us"] - base
            rate = f"{med[mode]['rps']:.2f} Gbit/s" if workload == "bulk" else f"{med[mode]['rps']:.0f}"
            print(f"| {workload} | {mode} | {rate} | {med[mode]['cpu_us']:.2f} | {over:.2f} | "
                  f"{over / ha if ha > 0 else float('nan'):.2f} | {med[mode]['cpu_us'] / med['nft']['cpu_us']:.2f} |")
    log = (tmp / "l4lb.log").read_text()
    if "error" in log.lower():
        print("\nl4lb log:\n" + log[-2000:])


if __name__ == "__main__":
    main()
