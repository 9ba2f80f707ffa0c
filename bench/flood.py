#!/usr/bin/env python3
"""A flood from a blocked or rate-limited source beside an allowed client (issues 14, 16),
l4lb beside HAProxy.

Three network namespaces joined by two veth pairs, all addresses from documentation ranges:

    fl-c  client   198.51.100.2  ── l4c | l4s1 198.51.100.10 ┐
                                                             ├ fl-s: the proxy on :8080
    fl-a  attacker 203.0.113.1   ── l4a | l4s2 203.0.113.10  ┘       (CPU 1), nginx backend

Two policies (--policy): `block`, 203.0.113.0/24 is blocked; `ratelimit`, every source may
open 100 connections per second (burst 100). While the attacker floods for --duration
seconds, wrk runs keep-alive requests from the client. Two attacks:

  syn      hping3 --flood at the client's priority (60–95k SYN/s here, what CPU 0 leaves it;
           the table says what it sent; --interval paces it instead): nothing completes a
           handshake, so the cost is the kernel's (SYN-ACKs, RSTs) unless XDP drops first.
  connect  the attacker opens real connections as fast as it can, 50 at a time (each sends
           a request and waits up to 1 s for the answer; a connect not done in 1 s is
           abandoned): a proxy without XDP accepts every one before its own check rejects it.

Proxies: l4lb with XDP (native on both veths), l4lb with `mode: userspace`, HAProxy 2.6
with `tcp-request connection reject if { src 203.0.113.0/24 }` (block) or a stick table
tracking `conn_rate(1s)` per source and rejecting over 100 (ratelimit), and a run without
attack.
Reported per proxy: its process CPU per second, the machine's busy CPU per second (every
CPU, softirq included: where the kernel's share of a flood shows), the client's requests
per second, and what the attacker managed (SYNs sent, or connections per second:
completed handshakes, answered requests, abandoned connects).

The attacker, the client and the backend share CPU 0; the proxy has CPU 1.
    python3 bench/flood.py [--policy block,ratelimit] [--attack syn,connect] [--duration 10] [--rounds 3]
"""
import argparse
import re
import resource
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
LIMIT = 100  # new connections per second per source, burst as many (--policy ratelimit)


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


def backend_conf(tmp):
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
    return tmp / "backend.conf"


def write_configs(tmp, l4lb_bin, policy):
    if policy == "block":
        l4lb_policy = "  block_sources: [203.0.113.0/24]\n"
        haproxy_policy = "    tcp-request connection reject if { src 203.0.113.0/24 }\n"
    else:
        l4lb_policy = ""
        haproxy_policy = (f"    stick-table type ip size 100k expire 30s store conn_rate(1s)\n"
                          f"    tcp-request connection track-sc0 src\n"
                          f"    tcp-request connection reject if {{ sc_conn_rate(0) gt {LIMIT} }}\n")
    for name, mode in (("l4lb", "native"), ("l4lb-userspace", "userspace")):
        # One listener per proxy address: a wildcard one would also live on lo, which the
        # program is not attached to, and keep its buckets in user space.
        rate_limit = (f"rate_limit: {{ per_source: {{ new_connections: {{ rate: {LIMIT}/s, burst: {LIMIT} }} }} }}\n"
                      if policy == "ratelimit" else "")
        (tmp / f"{name}.yaml").write_text(f"""
workers: 1
drain_timeout: 1s
admin: {{ address: "127.0.0.1:18152" }}
{rate_limit}listeners:
  - {{ name: http, address: "198.51.100.10:{PORT}", cluster: http }}
  - {{ name: edge, address: "203.0.113.10:{PORT}", cluster: http }}
clusters:
  - {{ name: http, endpoints: [{{ address: "127.0.0.1:{BACKEND}" }}] }}
filter:
  xdp: {{ interfaces: [l4s1, l4s2], mode: {mode}, pin_path: /sys/fs/bpf/l4lb-flood }}
{l4lb_policy}""")
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
{haproxy_policy}    default_backend http
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


def attack_process(procs, attack, duration, interval, senders):
    if attack == "syn":
        # --flood by default; with --interval, hping3 sleeps that long between SYNs and wakes
        # later (one reaches ~30,000 SYN/s beside the client), so --senders of them can run.
        # Each stops (and prints its count) when the window ends; the table says what they sent.
        pace = f"nice -n -10 timeout -k 3 -s INT {duration} hping3 -i u{interval}" if interval else \
            f"timeout -k 3 -s INT {duration} hping3 --flood"
        one = f"{pace} -q -S -p {PORT} 203.0.113.10 &"
        return procs.start("hping3", in_ns(NS_ATTACKER, ["bash", "-c", " ".join([one] * senders) + " wait"]),
                           bench.LOAD_CPU, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return procs.start("attacker", in_ns(NS_ATTACKER, [sys.executable, "-c", CONNECT_FLOOD, str(duration)]),
                       bench.LOAD_CPU, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# The connect attacker: 50 connections in flight; prints "attempts N established E served S
# abandoned M" (attempts: every connect that ended, refused or reset ones too).
CONNECT_FLOOD = f"""
import selectors, socket, sys, time
end = time.time() + int(sys.argv[1])
sel = selectors.DefaultSelector()
attempts = established = served = abandoned = 0
def open_one():
    s = socket.socket(); s.setblocking(False)
    s.connect_ex(("203.0.113.10", {PORT}))
    sel.register(s, selectors.EVENT_WRITE, time.time())
def done(s):
    global attempts
    attempts += 1; sel.unregister(s); s.close(); open_one()
for _ in range(50): open_one()
while time.time() < end:
    now = time.time()
    for key, events in sel.select(0.05):
        s = key.fileobj
        if key.events == selectors.EVENT_WRITE:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                done(s); continue
            established += 1
            try:
                s.send(b"GET / HTTP/1.0\\r\\n\\r\\n")
                sel.modify(s, selectors.EVENT_READ, time.time())
            except OSError:
                done(s)
            continue
        try:
            if s.recv(4096): served += 1
        except OSError:
            pass
        done(s)
    for key in list(sel.get_map().values()):
        if now - key.data > 1.0:
            abandoned += 1; done(key.fileobj)
print(f"attempts {{attempts}} established {{established}} served {{served}} abandoned {{abandoned}}")
"""


def attacker_figures(attack, output, duration, elapsed):
    """What the attacker managed, per second: SYNs sent, or connects by outcome."""
    if attack == "syn":
        sent = [int(n) for n in re.findall(r"(\d+) packets transmitted", output)]
        return {"syn_sent": sum(sent) / elapsed} if sent else {}
    m = re.search(r"attempts (\d+) established (\d+) served (\d+) abandoned (\d+)", output)
    if not m:
        return {}
    return dict(zip(("connects", "established", "served", "abandoned"), (int(m.group(i)) / duration for i in (1, 2, 3, 4))))


def describe_attacker(figures):
    """The attacker's column, from a run's figures (which hold attacker_figures' keys)."""
    if "syn_sent" in figures:
        return f"{figures['syn_sent']:,.0f} SYN/s sent"
    if "connects" not in figures:
        return "-"
    return (f"{figures['connects']:,.0f} connects/s: {figures['established']:,.0f} established, "
            f"{figures['served']:,.0f} served, {figures['abandoned']:,.0f} abandoned")


def run_one(procs, name, argv, attack, duration, interval, senders):
    proxy = procs.start(name, in_ns(NS_PROXY, argv), bench.PROXY_CPU)
    try:
        wait_served()
        pids = bench.group_pids(proxy)
        cpu0, busy0, t0 = bench.proc_cpu_seconds(pids), bench.machine_busy_seconds(), time.time()
        attacker = attack_process(procs, attack, duration, interval, senders) if attack else None
        client = subprocess.run(in_ns(NS_CLIENT, ["taskset", "-c", bench.LOAD_CPU, "wrk", "-t1", "-c20",
                                                  f"-d{duration}s", f"http://198.51.100.10:{PORT}/"]),
                                capture_output=True, text=True)
        # Every process of the attacker is waited for down its chain (ip netns exec, nice,
        # timeout), so its CPU arrives in this process's children's usage when it ends.
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        output = attacker.communicate(timeout=duration * 3 + 30)[0] if attacker else ""
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        attacker_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        elapsed = time.time() - t0
        attack_elapsed = max(elapsed, duration)
        cpu, busy = bench.proc_cpu_seconds(pids) - cpu0, bench.machine_busy_seconds() - busy0
        requests = bench.parse_wrk(client.stdout)["units"]
        return {
            "proxy_cpu": cpu / elapsed, "machine_busy": busy / elapsed, "client_rps": requests / duration,
            "cpu_per_request": cpu / requests * 1e6 if requests else None,
            **(attacker_figures(attack, output, duration, attack_elapsed) if attack else {}),
            "attacker_cpu": attacker_cpu / elapsed,
        }
    finally:
        procs.stop(proxy)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="block,ratelimit")
    ap.add_argument("--attack", default="syn,connect")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--interval", type=int, default=0, help="µs each hping3 waits between SYNs; 0: --flood")
    ap.add_argument("--senders", type=int, default=1, help="hping3 processes at once")
    ap.add_argument("--rounds", type=int, default=1, help="every run this many times, alternating; medians")
    ap.add_argument("--l4lb", default=str(ROOT / ".build" / "release" / "l4lb"))
    args = ap.parse_args()
    procs = bench.Procs()
    netns_up()
    runs = {}  # label → one result per round, in the order first run
    try:
        with tempfile.TemporaryDirectory(prefix="l4lb-flood-") as tmp:
            tmp = Path(tmp)
            procs.start("backend", in_ns(NS_PROXY, ["nginx", "-e", "stderr", "-p", str(tmp), "-c", str(backend_conf(tmp))]),
                        bench.LOAD_CPU)
            for round in range(args.rounds):
                for policy in args.policy.split(","):
                    commands = write_configs(tmp, args.l4lb, policy)
                    haproxy = {"block": "HAProxy (tcp-request reject)", "ratelimit": f"HAProxy (stick table, conn_rate > {LIMIT})"}[policy]
                    plan = [(f"{policy}: l4lb, no attack", "l4lb", None)] + [
                        (f"{policy}, {attack}: {label}", name, attack)
                        for attack in args.attack.split(",")
                        for name, label in (("l4lb", "l4lb (XDP native)"), ("l4lb-userspace", "l4lb (mode: userspace)"),
                                            ("haproxy", haproxy))]
                    for label, name, attack in plan:
                        bench.log(f"flood: round {round + 1}/{args.rounds}, {label}")
                        runs.setdefault(label, []).append(
                            run_one(procs, name, commands[name], attack, args.duration, args.interval, args.senders))
    finally:
        procs.stop_all()
        netns_down()
        subprocess.run(["rm", "-rf", "/sys/fs/bpf/l4lb-flood"], check=False)
    print(f"| run ({args.duration} s each, median of {args.rounds}) | proxy CPU (s/s) | proxy CPU per client request (µs) "
          f"| machine busy (s/s) | client req/s | attacker | attacker CPU (s/s) |")
    print("|---|---|---|---|---|---|---|")
    for label, results in runs.items():
        r = {k: bench.median([x.get(k) for x in results]) for k in {k for x in results for k in x}
             if any(x.get(k) is not None for x in results)}
        per = f"{r['cpu_per_request']:.1f}" if "cpu_per_request" in r else "—"
        print(f"| {label} | {r['proxy_cpu']:.3f} | {per} | {r['machine_busy']:.3f} | {r['client_rps']:,.0f} "
              f"| {describe_attacker(r)} | {r['attacker_cpu']:.2f} |")


if __name__ == "__main__":
    main()
