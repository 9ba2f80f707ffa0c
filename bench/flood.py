#!/usr/bin/env python3
"""A flood from a blocked source beside an allowed client (issue 14), l4lb beside HAProxy.

Three network namespaces joined by two veth pairs, all addresses from documentation ranges:

    fl-c  client   198.51.100.2  ── l4c | l4s1 198.51.100.10 ┐
                                                             ├ fl-s: the proxy on :8080
    fl-a  attacker 203.0.113.1   ── l4a | l4s2 203.0.113.10  ┘       (CPU 1), nginx backend

203.0.113.0/24 is blocked. While the attacker floods for --duration seconds, wrk runs
keep-alive requests from the client. Two attacks:

  syn      hping3 sends SYNs at up to --rate (default 50,000/s; it reaches what CPU 0 allows,
           and the table says what it sent): nothing completes a
           handshake, so the cost is the kernel's (SYN-ACKs, RSTs) unless XDP drops first.
  connect  the attacker opens real connections as fast as it can, 50 at a time (each sends
           a request and closes; a connect not done in 1 s is abandoned): a proxy without
           XDP accepts every one before its own check rejects it.

Proxies: l4lb with XDP (native on both veths), l4lb with `mode: userspace`, HAProxy 2.6
with `tcp-request connection reject if { src 203.0.113.0/24 }`, and a run without attack.
Reported per proxy: its process CPU per second, the machine's busy CPU per second (every
CPU, softirq included: where the kernel's share of a flood shows), the client's requests
per second, and what the attacker managed (SYNs sent, or connections per second).

The attacker, the client and the backend share CPU 0; the proxy has CPU 1.
    python3 bench/flood.py [--attack syn,connect] [--duration 10] [--rate 50000]
"""
import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (Procs, CPU and wrk helpers)

ROOT = bench.ROOT
PORT = 8080
BACKEND = 18100
NS_CLIENT, NS_ATTACKER, NS_PROXY = "fl-c", "fl-a", "fl-s"


def sh(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True).stdout


def netns_up():
    netns_down()
    for ns in (NS_CLIENT, NS_ATTACKER, NS_PROXY):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    for (ns, dev, peer, address, proxy_address) in (
        (NS_CLIENT, "l4c", "l4s1", "198.51.100.2/24", "198.51.100.10/24"),
        (NS_ATTACKER, "l4a", "l4s2", "203.0.113.1/24", "203.0.113.10/24"),
    ):
        sh("ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", peer, "netns", NS_PROXY)
        sh("ip", "-n", ns, "addr", "add", address, "dev", dev)
        sh("ip", "-n", NS_PROXY, "addr", "add", proxy_address, "dev", peer)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", NS_PROXY, "link", "set", peer, "up")


def netns_down():
    for ns in (NS_CLIENT, NS_ATTACKER, NS_PROXY):
        sh("ip", "netns", "del", ns, check=False)


def in_ns(ns, argv):
    return ["ip", "netns", "exec", ns] + argv


def write_configs(tmp, l4lb_bin):
    (tmp / "backend.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/backend.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    server {{ listen 127.0.0.1:{BACKEND}; location / {{ return 200 "hello world\\n"; }} }}
}}
""")
    for name, mode in (("l4lb", "native"), ("l4lb-userspace", "userspace")):
        (tmp / f"{name}.yaml").write_text(f"""
workers: 1
drain_timeout: 1s
admin: {{ address: "127.0.0.1:18152" }}
listeners:
  - {{ name: http, address: "0.0.0.0:{PORT}", cluster: http }}
clusters:
  - {{ name: http, endpoints: [{{ address: "127.0.0.1:{BACKEND}" }}] }}
filter:
  xdp: {{ interfaces: [l4s1, l4s2], mode: {mode}, pin_path: /sys/fs/bpf/l4lb-flood }}
  block_sources: [203.0.113.0/24]
""")
    (tmp / "haproxy.cfg").write_text(f"""
global
    nbthread 1
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1m
    timeout server 1m
frontend http
    bind 0.0.0.0:{PORT}
    tcp-request connection reject if {{ src 203.0.113.0/24 }}
    default_backend http
backend http
    server s1 127.0.0.1:{BACKEND}
""")
    return {
        "l4lb": [str(l4lb_bin), "run", "--config", str(tmp / "l4lb.yaml")],
        "l4lb-userspace": [str(l4lb_bin), "run", "--config", str(tmp / "l4lb-userspace.yaml")],
        "haproxy": ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")],
    }


def wait_served(timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = subprocess.run(in_ns(NS_CLIENT, ["curl", "-s", "-m", "1", f"http://198.51.100.10:{PORT}/"]),
                           capture_output=True, text=True)
        if r.stdout.startswith("hello"):
            return
        time.sleep(0.2)
    raise RuntimeError("the proxy did not serve the client")


def attack_process(procs, attack, duration, rate):
    if attack == "syn":
        # At most --rate; hping3 stops (and prints its count) when the window ends.
        interval = max(1, 1_000_000 // rate)
        return procs.start("hping3", in_ns(NS_ATTACKER, [
            "timeout", "-s", "INT", str(duration), "hping3", "-q", "-S", "-p", str(PORT), "-i", f"u{interval}",
            "203.0.113.10"]), bench.LOAD_CPU, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return procs.start("attacker", in_ns(NS_ATTACKER, [sys.executable, "-c", CONNECT_FLOOD, str(duration)]),
                       bench.LOAD_CPU, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# The connect attacker: 50 connections in flight; prints "established N abandoned M".
CONNECT_FLOOD = f"""
import selectors, socket, sys, time
end = time.time() + int(sys.argv[1])
sel = selectors.DefaultSelector()
established = abandoned = 0
def open_one():
    s = socket.socket(); s.setblocking(False)
    s.connect_ex(("203.0.113.10", {PORT}))
    sel.register(s, selectors.EVENT_WRITE, time.time())
for _ in range(50): open_one()
while time.time() < end:
    now = time.time()
    for key, _ in sel.select(0.05):
        s = key.fileobj; sel.unregister(s)
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            established += 1
            try: s.send(b"GET / HTTP/1.0\\r\\n\\r\\n")
            except OSError: pass
        s.close(); open_one()
    for key in list(sel.get_map().values()):
        if now - key.data > 1.0:
            sel.unregister(key.fileobj); key.fileobj.close(); abandoned += 1; open_one()
print(f"established {{established}} abandoned {{abandoned}}")
"""


def attacker_figure(attack, output, duration, elapsed):
    if attack == "syn":
        m = re.search(r"(\d+) packets transmitted", output)
        return f"{int(m.group(1)) / elapsed:,.0f} SYN/s sent" if m else "hping3: no summary"
    m = re.search(r"established (\d+) abandoned (\d+)", output)
    if not m:
        return "attacker: no summary"
    return f"{int(m.group(1)) / duration:,.0f} conn/s established, {int(m.group(2)) / duration:,.0f}/s abandoned"


def run_one(procs, name, argv, attack, duration, rate):
    proxy = procs.start(name, in_ns(NS_PROXY, argv), bench.PROXY_CPU)
    try:
        wait_served()
        pids = bench.group_pids(proxy)
        cpu0, busy0, t0 = bench.proc_cpu_seconds(pids), bench.machine_busy_seconds(), time.time()
        attacker = attack_process(procs, attack, duration, rate) if attack else None
        client = subprocess.run(in_ns(NS_CLIENT, ["taskset", "-c", bench.LOAD_CPU, "wrk", "-t1", "-c20",
                                                  f"-d{duration}s", f"http://198.51.100.10:{PORT}/"]),
                                capture_output=True, text=True)
        output = attacker.communicate(timeout=duration * 3 + 30)[0] if attacker else ""
        elapsed = time.time() - t0
        attack_elapsed = max(elapsed, duration)
        cpu, busy = bench.proc_cpu_seconds(pids) - cpu0, bench.machine_busy_seconds() - busy0
        requests = bench.parse_wrk(client.stdout)["units"]
        return {
            "proxy_cpu": cpu / elapsed, "machine_busy": busy / elapsed, "client_rps": requests / duration,
            "cpu_per_request": cpu / requests * 1e6 if requests else None,
            "attacker": attacker_figure(attack, output, duration, attack_elapsed) if attack else "-",
        }
    finally:
        procs.stop(proxy)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attack", default="syn,connect")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rate", type=int, default=50_000)
    ap.add_argument("--l4lb", default=str(ROOT / ".build" / "release" / "l4lb"))
    args = ap.parse_args()
    procs = bench.Procs()
    netns_up()
    try:
        with tempfile.TemporaryDirectory(prefix="l4lb-flood-") as tmp:
            tmp = Path(tmp)
            commands = write_configs(tmp, args.l4lb)
            procs.start("backend", in_ns(NS_PROXY, ["nginx", "-e", "stderr", "-p", str(tmp), "-c", str(tmp / "backend.conf")]),
                        bench.LOAD_CPU)
            rows = []
            rows.append(("l4lb, no attack", run_one(procs, "l4lb", commands["l4lb"], None, args.duration, args.rate)))
            for attack in args.attack.split(","):
                for name in ("l4lb", "l4lb-userspace", "haproxy"):
                    label = {"l4lb": "l4lb (XDP native)", "l4lb-userspace": "l4lb (mode: userspace)",
                             "haproxy": "HAProxy (tcp-request reject)"}[name]
                    bench.log(f"flood: {attack} against {label}")
                    rows.append((f"{attack}: {label}", run_one(procs, name, commands[name], attack, args.duration, args.rate)))
    finally:
        procs.stop_all()
        netns_down()
        subprocess.run(["rm", "-rf", "/sys/fs/bpf/l4lb-flood"], check=False)
    print(f"| run ({args.duration} s each) | proxy CPU (s/s) | proxy CPU per client request (µs) | machine busy (s/s) | client req/s | attacker |")
    print("|---|---|---|---|---|---|")
    for label, r in rows:
        per = f"{r['cpu_per_request']:.1f}" if r["cpu_per_request"] is not None else "—"
        print(f"| {label} | {r['proxy_cpu']:.3f} | {per} | {r['machine_busy']:.3f} | {r['client_rps']:,.0f} | {r['attacker']} |")


if __name__ == "__main__":
    main()
