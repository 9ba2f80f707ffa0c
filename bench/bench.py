#!/usr/bin/env python3
"""l4lb against HAProxy and nginx stream, measured side by side (../shared/BENCH.md).

Every proxy runs one worker pinned to CPU 1; backends and load generators run on CPU 0.
The headline figure is machine CPU (all CPUs, /proc/stat) per unit of work minus the
direct run's; the proxy process's own CPU (/proc/PID/stat) is reported beside it.
Runs alternate between proxies, a few rounds, and medians are reported.
"""
import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CPU = "1"
LOAD_CPU = "0"
# Each process's open-file limit: the hard limit (20,000 on these machines, and not raisable
# here). A proxied connection holds two descriptors and HAProxy's splice mode reserves
# pipes (two more per four connections), so maxconn is 3/8 of it and idle-memory opens 7,000.
NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

# Ports: backends, then one pair (http, bulk) per proxy.
BACKEND_HTTP = 18100
BACKEND_BULK = 18101
PORTS = {
    "direct": (BACKEND_HTTP, BACKEND_BULK),
    "l4lb": (18110, 18111),
    "haproxy": (18120, 18121),
    "haproxy-splice": (18130, 18131),
    "nginx": (18140, 18141),
    # Another l4lb build (--baseline), to judge a data-plane change in the same run.
    "l4lb-baseline": (18150, 18151),
    # The same l4lb with the access log written to a file and /metrics scraped once a
    # second (--observed): what observability costs per request.
    "l4lb-observed": (18160, 18161),
}
ADMIN_PORTS = {"l4lb": 18152, "l4lb-baseline": 18153, "l4lb-observed": 18154}
# udp-dns: nsd, and a UDP listener per proxy that has one (HAProxy's free edition has none).
BACKEND_DNS = 18102
DNS_PORTS = {"direct": BACKEND_DNS, "l4lb": 18112, "l4lb-baseline": 18157, "l4lb-observed": 18167, "nginx": 18142}
# udp-dns-per-query: DNS as operators configure it, each query its own exchange — l4lb's
# `session: none` (pooled upstream sockets) against nginx's `proxy_responses 1`.
DNS_PER_QUERY_PORTS = {"direct": BACKEND_DNS, "l4lb": 18113, "l4lb-baseline": 18158, "l4lb-observed": 18168, "nginx": 18143}
# udp-dns-kernel: the udp-dns sessions with l4lb's `relay: kernel` (a tc program on lo
# rewrites each session's datagrams once its endpoint is picked), against the same nginx
# listener as udp-dns.
DNS_KERNEL_PORTS = {"direct": BACKEND_DNS, "l4lb": 18114, "nginx": DNS_PORTS["nginx"]}
DNS_NAMES = 100
# TLS: the backend nginx also serves HTTPS (direct), a plain sink and a TLS sink take
# tls-bulk; each proxy terminates TLS on (tls http, tls bulk) with the same ECDSA P-256
# certificate and TLS 1.3 suite order, one thread.
BACKEND_HTTPS = 18103
BACKEND_SINK = 18104
BACKEND_TLS_SINK = 18105
TLS_PORTS = {
    "direct": (BACKEND_HTTPS, BACKEND_TLS_SINK),
    "l4lb": (18114, 18115), "l4lb-baseline": (18155, 18156), "l4lb-observed": (18165, 18166),
    "haproxy": (18122, 18123), "haproxy-splice": (18132, 18133), "nginx": (18145, 18146),
}
# s_time clients at once in tls-handshake and tls-resumed (tls-handshake-serial runs one).
TLS_CLIENTS = 4
TLS_CA_FILE = None  # the run's certificate (set in main), which the TLS clients trust
TLS_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
TLS_TOOLS = ROOT / "bench" / "tls_tools.py"
# tls-handshake-lean: full handshakes from a client that costs ~0.2 ms each (built in main).
LEAN_CLIENT_SOURCE = ROOT / "bench" / "tls_handshakes.c"
LEAN_CLIENT = None
LEAN_CLIENT_THREADS = 8
# HAProxy runs in two modes; ratios are taken against the better of them.
HAPROXY_MODES = ("haproxy", "haproxy-splice")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Processes

class Procs:
    """Every process the run starts; all are stopped on exit, error or Ctrl-C."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, cpu, **kw):
        wrapped = ["bash", "-c", f"ulimit -Sn {NOFILE}; exec taskset -c {cpu} \"$@\"", name] + argv
        p = subprocess.Popen(wrapped, stdout=kw.pop("stdout", subprocess.DEVNULL),
                             stderr=kw.pop("stderr", subprocess.DEVNULL), start_new_session=True, **kw)
        self.procs.append((name, p))
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=10):
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def stop_all(self):
        for _, p in reversed(self.procs):
            self.stop(p, timeout=5)
        self.procs.clear()


def wait_port(port, timeout=10, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def group_pids(p):
    """The process and its children (nginx master + worker)."""
    pids = [p.pid]
    try:
        for line in subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True, text=True).stdout.split():
            if int(line) not in pids:
                pids.append(int(line))
    except Exception:
        pass
    return pids


def proc_cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (FileNotFoundError, IndexError, ProcessLookupError):
            pass
    return total / CLK_TCK


def proc_rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def machine_busy_seconds():
    """Busy time as BENCH.md defines it: user + nice + system + irq + softirq. Steal (the
    host running something else on our vCPU) is not work done here and is left out."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


# ---------------------------------------------------------------------------------------
# Configurations

def write_certificate(tmp):
    """One ECDSA P-256 certificate for every TLS server in the run (HAProxy wants the
    certificate and key in one file)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp / "tls.key"), "-out", str(tmp / "tls.pem"), "-days", "2",
                    "-subj", "/CN=bench.example.test", "-addext", "subjectAltName=DNS:bench.example.test"],
                   check=True, capture_output=True)
    (tmp / "tls-haproxy.pem").write_text((tmp / "tls.pem").read_text() + (tmp / "tls.key").read_text())


def write_configs(tmp, l4lb_bin, baseline_bin=None):
    cfg = {}
    write_certificate(tmp)
    with open(tmp / "big.bin", "wb") as f:  # sparse: no disk is written
        f.truncate(64 << 30)
    (tmp / "backend-nginx.conf").write_text(f"""
worker_processes 1;
worker_rlimit_nofile {NOFILE};
daemon off;
pid {tmp}/backend-nginx.pid;
error_log stderr error;
events {{ worker_connections {NOFILE}; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 600s;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{BACKEND_HTTP} backlog=65535 reuseport;
        location / {{ return 200 "hello world\\n"; }}
        # A download that never ends for a client that never reads (stalled-readers).
        location = /big {{ alias {tmp}/big.bin; }}
    }}
    server {{
        # tls workloads, direct: nginx terminates TLS itself.
        listen 127.0.0.1:{BACKEND_HTTPS} ssl backlog=65535;
        ssl_certificate {tmp}/tls.pem;
        ssl_certificate_key {tmp}/tls.key;
        # Debian's nginx 1.22 leaves TLS 1.3 off unless told: without this line it
        # negotiated TLS 1.2 while l4lb and HAProxy ran TLS 1.3.
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:direct:10m;
        ssl_conf_command Ciphersuites {TLS_SUITES};
        ssl_prefer_server_ciphers on;
        location / {{ return 200 "hello world\n"; }}
    }}
}}
""")
    tls_block = f'{{ certificates: [{{ cert: "{tmp}/tls.pem", key: "{tmp}/tls.key" }}], ciphersuites: "{TLS_SUITES}" }}'
    for name, admin in ADMIN_PORTS.items():
        h, b = PORTS[name]
        # Each l4lb its own admin port: they run at once.
        access_log = f'access_log: {{ path: "{tmp}/access.log", format: json }}' if name == "l4lb-observed" else ""
        # Only this build's l4lb: a --baseline binary may predate `relay`.
        dns_kernel = (f'  - {{ name: dns-kernel, address: "127.0.0.1:{DNS_KERNEL_PORTS[name]}", protocol: udp, cluster: dns, relay: kernel, idle_timeout: 10s }}\n'
                      if name in DNS_KERNEL_PORTS else "")
        (tmp / f"{name}.yaml").write_text(f"""
workers: 1
drain_timeout: 1s
admin: {{ address: "127.0.0.1:{admin}" }}
{access_log}
listeners:
  - {{ name: http, address: "127.0.0.1:{h}", cluster: http, idle_timeout: 10m, max_connections: 1000000 }}
  - {{ name: bulk, address: "127.0.0.1:{b}", cluster: bulk, idle_timeout: 10m }}
  - {{ name: dns, address: "127.0.0.1:{DNS_PORTS[name]}", protocol: udp, cluster: dns, idle_timeout: 10s }}
  - {{ name: dns-per-query, address: "127.0.0.1:{DNS_PER_QUERY_PORTS[name]}", protocol: udp, cluster: dns, session: none, idle_timeout: 10s }}
{dns_kernel}  - {{ name: tls, address: "127.0.0.1:{TLS_PORTS[name][0]}", cluster: http, idle_timeout: 10m, max_connections: 1000000, tls: {tls_block} }}
  - {{ name: tls-bulk, address: "127.0.0.1:{TLS_PORTS[name][1]}", cluster: sink, idle_timeout: 10m, tls: {tls_block} }}
clusters:
  - {{ name: http, endpoints: [{{ address: "127.0.0.1:{BACKEND_HTTP}" }}] }}
  - {{ name: bulk, endpoints: [{{ address: "127.0.0.1:{BACKEND_BULK}" }}] }}
  - {{ name: dns, endpoints: [{{ address: "127.0.0.1:{BACKEND_DNS}" }}] }}
  - {{ name: sink, endpoints: [{{ address: "127.0.0.1:{BACKEND_SINK}" }}] }}
""")
    for name, splice in (("haproxy", False), ("haproxy-splice", True)):
        h, b = PORTS[name]
        (tmp / f"{name}.cfg").write_text(f"""
global
    nbthread 1
    maxconn {max(1000, NOFILE * 3 // 8)}
    log stderr format raw local0 err
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    {"option splice-auto" if splice else ""}
frontend tls
    bind 127.0.0.1:{TLS_PORTS[name][0]} ssl crt {tmp}/tls-haproxy.pem ciphersuites {TLS_SUITES}
    default_backend http
frontend tls-bulk
    bind 127.0.0.1:{TLS_PORTS[name][1]} ssl crt {tmp}/tls-haproxy.pem ciphersuites {TLS_SUITES}
    default_backend sink
backend sink
    server s1 127.0.0.1:{BACKEND_SINK}
frontend http
    bind 127.0.0.1:{h}
    default_backend http
frontend bulk
    bind 127.0.0.1:{b}
    default_backend bulk
backend http
    server s1 127.0.0.1:{BACKEND_HTTP}
backend bulk
    server s1 127.0.0.1:{BACKEND_BULK}
""")
    h, b = PORTS["nginx"]
    (tmp / "nginx-stream.conf").write_text(f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
worker_rlimit_nofile {NOFILE};
daemon off;
pid {tmp}/nginx-stream.pid;
error_log stderr error;
events {{ worker_connections {NOFILE}; multi_accept on; }}
stream {{
    server {{ listen 127.0.0.1:{h} backlog=65535; proxy_pass 127.0.0.1:{BACKEND_HTTP}; proxy_timeout 10m; }}
    server {{ listen 127.0.0.1:{b} backlog=65535; proxy_pass 127.0.0.1:{BACKEND_BULK}; proxy_timeout 10m; }}
    # Sessions per client address, as l4lb's (proxy_requests/proxy_responses unlimited).
    server {{ listen 127.0.0.1:{DNS_PORTS["nginx"]} udp; proxy_pass 127.0.0.1:{BACKEND_DNS}; proxy_timeout 10s; }}
    server {{ listen 127.0.0.1:{DNS_PER_QUERY_PORTS["nginx"]} udp; proxy_pass 127.0.0.1:{BACKEND_DNS}; proxy_responses 1; proxy_timeout 10s; }}
    ssl_certificate {tmp}/tls.pem;
    ssl_certificate_key {tmp}/tls.key;
    ssl_protocols TLSv1.2 TLSv1.3;  # TLS 1.3 as everywhere else (nginx 1.22's default has none)
    ssl_session_cache shared:stream:10m;
    ssl_conf_command Ciphersuites {TLS_SUITES};
    ssl_prefer_server_ciphers on;
    server {{ listen 127.0.0.1:{TLS_PORTS["nginx"][0]} ssl backlog=65535; proxy_pass 127.0.0.1:{BACKEND_HTTP}; proxy_timeout 10m; }}
    server {{ listen 127.0.0.1:{TLS_PORTS["nginx"][1]} ssl; proxy_pass 127.0.0.1:{BACKEND_SINK}; proxy_timeout 10m; }}
}}
""")
    write_nsd(tmp)
    return {
        "l4lb": [str(l4lb_bin), "run", "--config", str(tmp / "l4lb.yaml")],
        "l4lb-baseline": [str(baseline_bin), "run", "--config", str(tmp / "l4lb-baseline.yaml")],
        "l4lb-observed": [str(l4lb_bin), "run", "--config", str(tmp / "l4lb-observed.yaml")],
        "haproxy": ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")],
        "haproxy-splice": ["haproxy", "-db", "-f", str(tmp / "haproxy-splice.cfg")],
        "nginx": ["nginx", "-e", "stderr", "-p", str(tmp), "-c", str(tmp / "nginx-stream.conf")],
    }


def write_nsd(tmp, address=f"127.0.0.1@{BACKEND_DNS}", names=DNS_NAMES):
    """nsd serving example.test (hostN → 192.0.2.N%250+1) on `address` (IP@PORT) with
    response-rate limiting off, and dnsperf's query file over those names (bench/routed.py
    uses it too)."""
    zone = ["$ORIGIN example.test.", "$TTL 300", "@ IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 300",
            "@ IN NS ns.example.test.", "ns IN A 192.0.2.254"]
    zone += [f"host{n} IN A 192.0.2.{n % 250 + 1}" for n in range(names)]
    (tmp / "example.test.zone").write_text("\n".join(zone) + "\n")
    (tmp / "nsd.conf").write_text(f"""
server:
  ip-address: {address}
  username: ""
  chroot: ""
  zonesdir: "{tmp}"
  pidfile: "{tmp}/nsd.pid"
  xfrdfile: "{tmp}/xfrd.state"
  zonelistfile: "{tmp}/zone.list"
  database: ""
  logfile: "{tmp}/nsd.log"
  verbosity: 0
  server-count: 1
  rrl-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: example.test
  zonefile: example.test.zone
""")
    (tmp / "queries.txt").write_text("".join(f"host{n}.example.test A\n" for n in range(names)))


def wait_dns(port, timeout=10, proc=None):
    """Until a query to `port` is answered."""
    query = bytes.fromhex("12340100000100000000000005686f737430076578616d706c65047465737400 0001 0001".replace(" ", ""))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before answering DNS on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.3)
            try:
                s.sendto(query, ("127.0.0.1", port))
                if s.recv(512)[:2] == query[:2]:
                    return
            except OSError:
                pass
    raise RuntimeError(f"no DNS answer on {port} after {timeout}s")


def run_dnsperf(port, duration, queries):
    """dnsperf -c 20 as BENCH.md has it: 20 client sockets, as fast as answers come."""
    argv = ["taskset", "-c", LOAD_CPU, "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries),
            "-c", "20", "-l", str(duration), "-t", "2"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30).stdout
    figures = {}
    for key, pattern in (("sent", r"Queries sent:\s+(\d+)"), ("units", r"Queries completed:\s+(\d+)"),
                         ("lost", r"Queries lost:\s+(\d+)"), ("rate", r"Queries per second:\s+([\d.]+)")):
        m = re.search(pattern, out)
        figures[key] = float(m.group(1)) if m else 0.0
    m = re.search(r"Average Latency \(s\):\s+([\d.]+)", out)
    if m:
        figures["p50_ms"] = float(m.group(1)) * 1e3  # dnsperf reports the mean, shown in the p50 place
    if not figures["units"]:
        raise RuntimeError(f"dnsperf: {out.strip()[-300:]}")
    if figures["lost"]:
        figures["errors"] = f"{int(figures['lost'])} lost"
    return figures


# ---------------------------------------------------------------------------------------
# Workloads: each returns {"units": n, "unit": …, extra figures}

def parse_wrk(out):
    figures = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    figures["rate"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in", out)
    figures["units"] = int(m.group(1)) if m else 0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)", out, re.M)
        if m:
            scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
            figures[f"p{pct}_ms"] = float(m.group(1)) * scale
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    figures["errors"] = (errors.group(1) if errors else "") + (f" non2xx={non2xx.group(1)}" if non2xx else "")
    return figures


def run_wrk(port, duration, close, tls=False):
    """wrk, 50 connections; `close` makes every request a new connection. Over https wrk
    keeps each connection's latest TLS session and offers it on the next, so with `close`
    these are resumed handshakes, each spending the single-use ticket the last one got."""
    argv = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c50", f"-d{duration}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"{'https' if tls else 'http'}://127.0.0.1:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30).stdout
    return parse_wrk(out)


def run_iperf(port, duration, streams):
    argv = ["taskset", "-c", LOAD_CPU, "iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(duration), "-J"]
    if streams > 1:
        argv += ["-P", str(streams)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    data = json.loads(res.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    received = data["end"]["sum_received"]
    return {"units": received["bytes"] / 1e9, "rate": received["bits_per_second"] / 1e9}


def run_s_time(port, duration, reuse, clients=1):
    """`openssl s_time`: each client opens one connection after another, each a handshake
    (full with -new, or resuming one saved session with -reuse) and one HTTP/1.0 request.
    With several clients at once the handshakes overlap, so the figure is the proxy's
    handshake rate rather than one client's round trips; taken over wall time."""
    # The client trusts the bench's own certificate and nothing else: left to its defaults,
    # s_time searches the system's CA directory on every handshake, which costs it more
    # CPU (2.4 ms a handshake here, on the load CPU) than any proxy spends.
    argv = ["taskset", "-c", LOAD_CPU, "openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-reuse" if reuse else "-new",
            "-time", str(duration), "-www", "/", "-CAfile", str(TLS_CA_FILE), "-no-CApath", "-no-CAstore"]
    start = time.time()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(clients)]
    units = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=duration + 30)
        m = re.search(r"(\d+) connections in [\d.]+s", out)
        units += int(m.group(1)) if m else 0
    elapsed = time.time() - start
    return {"units": units, "rate": units / elapsed if elapsed else 0.0}


def run_lean_handshakes(port, duration):
    """Full TLS 1.3 handshakes, one request each, from `bench/tls_handshakes.c`: 8 threads
    of one connection after another. s_time and wrk spend more CPU on a full handshake than
    the proxy does (OpenSSL 3.0's libssl on the client side), so with one load CPU they,
    not the proxy, set the rate; this client spends about 0.2 ms, and the proxy is the limit."""
    argv = ["taskset", "-c", LOAD_CPU, str(LEAN_CLIENT), str(port), str(duration), str(LEAN_CLIENT_THREADS)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    data = json.loads(out.stdout)
    if data["handshakes"] == 0 or data["errors"] > data["handshakes"] / 100:
        raise RuntimeError(f"tls_handshakes: {data['handshakes']} handshakes, {data['errors']} errors")
    return {"units": data["handshakes"], "rate": data["handshakes"] / data["seconds"]}


def run_tls_bulk(port, duration):
    out = subprocess.run(["taskset", "-c", LOAD_CPU, sys.executable, str(TLS_TOOLS), "send", "--port", str(port), "--seconds", str(duration)],
                         capture_output=True, text=True, timeout=duration + 30)
    data = json.loads(out.stdout)
    return {"units": data["bytes"] / 1e9, "rate": data["bytes"] * 8 / data["seconds"] / 1e9}


def measure(pids, fn):
    """Runs fn() and returns its figures plus machine and process CPU seconds."""
    m0, p0, t0 = machine_busy_seconds(), proc_cpu_seconds(pids), time.time()
    figures = fn()
    m1, p1, t1 = machine_busy_seconds(), proc_cpu_seconds(pids), time.time()
    figures["machine_cpu_s"] = m1 - m0
    figures["proc_cpu_s"] = p1 - p0
    figures["wall_s"] = t1 - t0
    return figures


def idle_memory(port, pids, count):
    """Opens `count` connections through the proxy, one request each, then leaves them idle."""
    base = proc_rss_kib(pids)
    socks = []
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(request)
            got = b""
            while b"hello world\n" not in got:
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError("connection closed during idle-memory setup")
                got += chunk
            socks.append(s)
        time.sleep(1.0)
        after = proc_rss_kib(pids)
    finally:
        for s in socks:
            s.close()
    return {"units": count, "rss_growth_kib": after - base, "bytes_per_conn": (after - base) * 1024 / count}


def start_scraper(port):
    """GET /metrics once a second for the rest of the run, as a (demanding) Prometheus."""
    import threading
    import urllib.request

    def scrape():
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
            except OSError:
                pass
            time.sleep(1)

    threading.Thread(target=scrape, daemon=True).start()


def wait_quiet(pids, timeout=15.0):
    """Waits until `pids` use under 5% of a CPU over half a second (or `timeout`)."""
    deadline = time.time() + timeout
    last = proc_cpu_seconds(pids)
    while time.time() < deadline:
        time.sleep(0.5)
        now = proc_cpu_seconds(pids)
        if now - last < 0.025:
            return True
        last = now
    return False


def stalled_readers(port, pids, duration, count):
    """The hostile-load case of issue 10: `count` clients download a file that never ends
    through the proxy and never read it (4 KiB receive buffers), while wrk's 50 keep-alive
    clients run rr-keepalive through the same listener and worker. Reports wrk's figures."""
    socks = []
    request = b"GET /big HTTP/1.1\r\nHost: bench\r\n\r\n"
    try:
        for _ in range(count):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
            s.sendall(request)
            socks.append(s)
        # The downloads fill every buffer on the way, then the proxy goes quiet.
        time.sleep(1.0)
        settled = wait_quiet(pids) if pids else True
        figures = run_wrk(port, duration, close=False)
        if not settled:
            figures["errors"] = (figures.get("errors", "") + " proxy never went quiet").strip()
        figures["stalled"] = count
        return figures
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------------------

WORKLOADS = {
    "rr-keepalive": ("requests", "µs/request", lambda port, d: run_wrk(port, d, close=False), 1e6),
    "conn-rate": ("connections", "µs/connection", lambda port, d: run_wrk(port, d, close=True), 1e6),
    "bulk-1": ("GB", "CPU-s/GB", lambda port, d: run_iperf(port, d, 1), 1.0),
    "bulk-4": ("GB", "CPU-s/GB", lambda port, d: run_iperf(port, d, 4), 1.0),
    "udp-dns": ("queries", "µs/query", None, 1e6),
    "udp-dns-per-query": ("queries", "µs/query", None, 1e6),
    "udp-dns-kernel": ("queries", "µs/query", None, 1e6),
    "tls-handshake": ("handshakes", "µs/handshake", lambda port, d: run_s_time(port, d, reuse=False, clients=TLS_CLIENTS), 1e6),
    "tls-handshake-lean": ("handshakes", "µs/handshake", run_lean_handshakes, 1e6),
    "tls-handshake-serial": ("handshakes", "µs/handshake", lambda port, d: run_s_time(port, d, reuse=False), 1e6),
    "tls-resumed": ("handshakes", "µs/handshake", lambda port, d: run_s_time(port, d, reuse=True, clients=TLS_CLIENTS), 1e6),
    "tls-resumed-chained": ("handshakes", "µs/handshake", lambda port, d: run_wrk(port, d, close=True, tls=True), 1e6),
    "tls-rr": ("requests", "µs/request", lambda port, d: run_wrk(port, d, close=False, tls=True), 1e6),
    "tls-bulk": ("GB", "CPU-s/GB", run_tls_bulk, 1.0),
}
TLS_WORKLOADS = ("tls-handshake", "tls-handshake-lean", "tls-handshake-serial", "tls-resumed", "tls-resumed-chained", "tls-rr", "tls-bulk")
DNS_WORKLOADS = {"udp-dns": DNS_PORTS, "udp-dns-per-query": DNS_PER_QUERY_PORTS, "udp-dns-kernel": DNS_KERNEL_PORTS}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one short round (under 2 minutes)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--duration", type=int, default=None, help="seconds per run")
    ap.add_argument("--proxies", default="direct,l4lb,haproxy,haproxy-splice,nginx")
    ap.add_argument("--workloads", default="rr-keepalive,conn-rate,bulk-1,bulk-4,udp-dns,udp-dns-per-query,udp-dns-kernel,tls-handshake,tls-handshake-lean,tls-resumed,tls-resumed-chained,tls-rr,tls-bulk,idle-memory")
    ap.add_argument("--idle-connections", type=int, default=min(10_000, NOFILE * 3 // 8 - 500))
    ap.add_argument("--stalled-readers", type=int, default=800,
                    help="clients that never read, for the opt-in stalled-readers workload")
    ap.add_argument("--l4lb", default=str(ROOT / ".build" / "release" / "l4lb"))
    ap.add_argument("--baseline", help="another l4lb binary, measured in the same run as proxy l4lb-baseline")
    ap.add_argument("--observed", action="store_true",
                    help="also run l4lb-observed: access log to a file, /metrics scraped every second")
    args = ap.parse_args()
    # Five short alternating rounds rather than three longer ones: the host's speed drifts
    # over seconds, and a median of five pairs is harder for one slow spell to move.
    rounds = args.rounds or (1 if args.quick else 5)
    duration = args.duration or (3 if args.quick else 4)
    idle_count = min(2000, args.idle_connections) if args.quick else args.idle_connections
    proxies = args.proxies.split(",")
    if args.baseline and "l4lb-baseline" not in proxies:
        proxies.insert(proxies.index("l4lb") + 1 if "l4lb" in proxies else len(proxies), "l4lb-baseline")
    if args.observed and "l4lb-observed" not in proxies:
        proxies.insert(proxies.index("l4lb") + 1 if "l4lb" in proxies else len(proxies), "l4lb-observed")
    workloads = args.workloads.split(",")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    procs = Procs()

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    tmp = Path(tempfile.mkdtemp(prefix="l4lb-bench-"))
    global TLS_CA_FILE, LEAN_CLIENT
    TLS_CA_FILE = tmp / "tls.pem"
    if "tls-handshake-lean" in workloads:
        LEAN_CLIENT = tmp / "tls_handshakes"
        compiler = shutil.which("cc") or shutil.which("clang")
        if compiler is None:
            sys.exit("bench: tls-handshake-lean needs a C compiler (cc or clang) to build bench/tls_handshakes.c")
        subprocess.run([compiler, "-O2", "-o", str(LEAN_CLIENT), str(LEAN_CLIENT_SOURCE), "-lcrypto", "-lpthread"], check=True)
    raw = {}  # workload -> proxy -> [figures per round]
    started = time.time()
    try:
        commands = write_configs(tmp, args.l4lb, args.baseline)
        log(f"bench: {rounds} round(s) × {duration}s, proxies {proxies}, workloads {workloads}")
        backend = procs.start("nginx-backend", ["nginx", "-e", "stderr", "-p", str(tmp), "-c", str(tmp / "backend-nginx.conf")], LOAD_CPU)
        iperf = procs.start("iperf3", ["iperf3", "-s", "-p", str(BACKEND_BULK)], LOAD_CPU)
        wait_port(BACKEND_HTTP, proc=backend)
        wait_port(BACKEND_BULK, proc=iperf)
        if any(w in TLS_WORKLOADS for w in workloads):
            procs.start("sink", [sys.executable, str(TLS_TOOLS), "sink", "--port", str(BACKEND_SINK)], LOAD_CPU)
            tls_sink = procs.start("tls-sink", [sys.executable, str(TLS_TOOLS), "sink", "--port", str(BACKEND_TLS_SINK),
                                                "--cert", str(tmp / "tls.pem"), "--key", str(tmp / "tls.key")], LOAD_CPU)
            wait_port(BACKEND_SINK)
            wait_port(BACKEND_TLS_SINK, proc=tls_sink)
        if any(w in DNS_WORKLOADS for w in workloads):
            nsd = procs.start("nsd", ["/usr/sbin/nsd", "-d", "-c", str(tmp / "nsd.conf")], LOAD_CPU)
            wait_dns(BACKEND_DNS, proc=nsd)
        running = {}
        for name in proxies:
            if name == "direct":
                continue
            p = procs.start(name, commands[name], PROXY_CPU, stderr=open(tmp / f"{name}.log", "w"))
            wait_port(PORTS[name][0], proc=p)
            if any(w in TLS_WORKLOADS for w in workloads) and name in TLS_PORTS:
                wait_port(TLS_PORTS[name][0], proc=p)
            running[name] = p
        if "l4lb-observed" in running:
            start_scraper(ADMIN_PORTS["l4lb-observed"])
        for rnd in range(rounds):
            for workload in workloads:
                if workload in ("idle-memory", "stalled-readers"):
                    continue
                unit, per, fn, scale = WORKLOADS[workload]
                if workload in DNS_WORKLOADS:
                    fn = lambda port, d: run_dnsperf(port, d, tmp / "queries.txt")
                # Each round starts one proxy further on, so over the rounds every proxy runs
                # first, in the middle and last alike (reversing every other round left the
                # middle one in the middle every time, and the first run of a set fared
                # differently from the others).
                shift = rnd % len(proxies)
                order = proxies[shift:] + proxies[:shift]
                for name in order:
                    if workload in DNS_WORKLOADS and name not in DNS_WORKLOADS[workload]:
                        continue
                    if workload in DNS_WORKLOADS:
                        port = DNS_WORKLOADS[workload][name]
                        if rnd == 0 and name in running:
                            wait_dns(port, proc=running[name])
                    elif workload in TLS_WORKLOADS:
                        port = TLS_PORTS[name][1 if workload == "tls-bulk" else 0]
                    else:
                        port = PORTS[name][1 if workload.startswith("bulk") else 0]
                    pids = group_pids(running[name]) if name in running else []
                    log(f"[{time.time() - started:5.0f}s] round {rnd + 1}/{rounds} {workload:13} {name:15} …")
                    try:
                        fig = measure(pids, lambda: fn(port, duration))
                    except Exception as e:  # one failed run is reported, not fatal
                        log(f"    failed: {e}")
                        continue
                    fig["cpu_per_unit"] = fig["machine_cpu_s"] / fig["units"] * scale if fig["units"] else None
                    fig["proc_cpu_per_unit"] = fig["proc_cpu_s"] / fig["units"] * scale if fig["units"] else None
                    fig["round"] = rnd
                    raw.setdefault(workload, {}).setdefault(name, []).append(fig)
                    log(f"    rate {fig['rate']:.2f}  machine {fig['cpu_per_unit']:.3f} {per}  process {fig['proc_cpu_per_unit']:.3f}")
        if "stalled-readers" in workloads:
            for name in proxies:
                if name != "direct" and name not in running:
                    continue
                log(f"[{time.time() - started:5.0f}s] stalled-readers {name}: {args.stalled_readers} never read, rr-keepalive beside them …")
                try:
                    pids = group_pids(running[name]) if name in running else []
                    fig = stalled_readers(PORTS[name][0], pids, duration, args.stalled_readers)
                    raw.setdefault("stalled-readers", {}).setdefault(name, []).append(fig)
                    log(f"    rate {fig['rate']:.0f} req/s  p99 {fig.get('p99_ms', float('nan')):.2f} ms  errors {fig.get('errors') or 'none'}")
                except Exception as e:
                    log(f"    failed: {e}")
        if "idle-memory" in workloads:
            for name in proxies:
                if name == "direct" or name not in running:
                    continue
                log(f"[{time.time() - started:5.0f}s] idle-memory {name}: {idle_count} connections …")
                try:
                    fig = idle_memory(PORTS[name][0], group_pids(running[name]), idle_count)
                    raw.setdefault("idle-memory", {}).setdefault(name, []).append(fig)
                    log(f"    {fig['bytes_per_conn']:.0f} bytes/connection")
                except Exception as e:
                    log(f"    failed: {e}")
    except KeyboardInterrupt:
        log("bench: interrupted, stopping everything")
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(130)
    finally:
        procs.stop_all()
    shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(raw)
    report(summary, raw, rounds, duration, time.time() - started)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(raw):
    summary = {}
    for workload, by_proxy in raw.items():
        summary[workload] = {}
        for name, runs in by_proxy.items():
            keys = set().union(*(r.keys() for r in runs))
            summary[workload][name] = {k: median([r.get(k) for r in runs]) for k in keys if k not in ("errors", "round")}
            errors = [r.get("errors") for r in runs if r.get("errors")]
            if errors:
                summary[workload][name]["errors"] = "; ".join(errors)
        direct = summary[workload].get("direct", {})
        for name, s in summary[workload].items():
            if name == "direct":
                continue
            if direct.get("cpu_per_unit") and s.get("cpu_per_unit") is not None:
                s["overhead_per_unit"] = s["cpu_per_unit"] - direct["cpu_per_unit"]
                s["cpu_vs_direct"] = s["cpu_per_unit"] / direct["cpu_per_unit"]
            if direct.get("rate") and s.get("rate") is not None:
                s["rate_vs_direct"] = s["rate"] / direct["rate"]
        for name, ratios in round_ratios(by_proxy).items():
            summary[workload][name]["round_ratios"] = ratios
    return summary


def round_ratios(by_proxy):
    """Per round, each proxy's overhead over HAProxy's best mode in that same round: runs
    of one round are minutes apart at most, so slow drift of the machine cancels out."""
    def per_round(name):
        return {r["round"]: r.get("cpu_per_unit") for r in by_proxy.get(name, []) if r.get("cpu_per_unit") is not None}
    direct = per_round("direct")
    haproxy = [per_round(h) for h in HAPROXY_MODES]
    ratios = {}
    for name in by_proxy:
        if name == "direct":
            continue
        for rnd, cpu in sorted(per_round(name).items()):
            best = [h[rnd] - direct[rnd] for h in haproxy if rnd in h and rnd in direct]
            if best and min(best) > 0:
                ratios.setdefault(name, []).append((cpu - direct[rnd]) / min(best))
    return ratios


def machine_info():
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    def version(argv, pattern):
        try:
            out = subprocess.run(argv, capture_output=True, text=True).stdout + subprocess.run(argv, capture_output=True, text=True).stderr
            m = re.search(pattern, out)
            return m.group(1) if m else "?"
        except FileNotFoundError:
            return "?"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": os.uname().release,
        "haproxy": version(["haproxy", "-v"], r"version (\S+)"),
        "nginx": version(["nginx", "-v"], r"nginx/(\S+)"),
        "wrk": version(["wrk", "-v"], r"wrk (\S+)"),
        "iperf3": version(["iperf3", "--version"], r"iperf (\S+)"),
    }


def fmt(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


# bench/RESULTS.md is rewritten on every run; what follows this line in it (notes written
# by hand, comparisons) is kept.
NOTES_MARKER = "<!-- Notes below are kept when scripts/bench rewrites this file. -->"


def report(summary, raw, rounds, duration, elapsed):
    info = machine_info()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"bench-{stamp}.json").write_text(json.dumps({"machine": info, "rounds": rounds, "duration_s": duration, "summary": summary, "raw": raw}, indent=2))

    lines = []
    lines.append(f"| workload | proxy | rate | machine CPU per unit | vs direct: rate, CPU | overhead over direct | vs HAProxy best | per round | process CPU per unit | p50 / p99 ms |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    rate_units = {"rr-keepalive": "req/s", "conn-rate": "conn/s", "bulk-1": "Gbit/s", "bulk-4": "Gbit/s", "udp-dns": "q/s", "udp-dns-per-query": "q/s", "udp-dns-kernel": "q/s",
                  "tls-handshake": "hs/s", "tls-handshake-lean": "hs/s", "tls-handshake-serial": "hs/s", "tls-resumed": "hs/s", "tls-resumed-chained": "hs/s", "tls-rr": "req/s", "tls-bulk": "Gbit/s"}
    for workload in ("rr-keepalive", "conn-rate", "bulk-1", "bulk-4", "udp-dns", "udp-dns-per-query", "udp-dns-kernel", *TLS_WORKLOADS):
        by = summary.get(workload)
        if not by:
            continue
        unit = WORKLOADS[workload][1]
        ha = [by[h]["overhead_per_unit"] for h in HAPROXY_MODES if h in by and by[h].get("overhead_per_unit") is not None]
        ha_best = min(ha) if ha else None
        for name in ("direct", "l4lb", "l4lb-baseline", "l4lb-observed", "haproxy", "haproxy-splice", "nginx"):
            s = by.get(name)
            if not s:
                continue
            rate = s.get("rate")
            rate_text = f"{rate / 1000:.1f}k {rate_units[workload]}" if workload in ("rr-keepalive", "conn-rate", "tls-rr", *DNS_WORKLOADS) and rate else f"{fmt(rate)} {rate_units[workload]}"
            if workload in TLS_WORKLOADS and name not in HAPROXY_MODES:
                # The TLS targets compare rates too: handshakes/s and Gbit/s against HAProxy's best.
                ha_rates = [by[h]["rate"] for h in HAPROXY_MODES if by.get(h, {}).get("rate")]
                if rate and ha_rates:
                    rate_text += f" ({rate / max(ha_rates):.2f}× HAProxy's)"
            ratio = s["overhead_per_unit"] / ha_best if s.get("overhead_per_unit") is not None and ha_best else None
            if workload in DNS_WORKLOADS:
                # No HAProxy here: the comparison is with nginx stream's overhead.
                lost = sum(int(r.get("lost") or 0) for r in raw[workload].get(name, []))
                rate_text += f", {lost} lost"
                nginx = by.get("nginx", {}).get("overhead_per_unit")
                if s.get("overhead_per_unit") is not None and nginx and name != "nginx":
                    rate_text += f", overhead {s['overhead_per_unit'] / nginx:.2f}× nginx's"
            lat = f"{fmt(s.get('p50_ms'))} / {fmt(s.get('p99_ms'))}" if "p50_ms" in s else ""
            rounds_text = ", ".join(f"{r:.2f}" for r in s.get("round_ratios", []))
            vs_direct = f"{fmt(s.get('rate_vs_direct'))}×, {fmt(s.get('cpu_vs_direct'))}×" if "rate_vs_direct" in s else ""
            lines.append(f"| {workload} | {name} | {rate_text} | {fmt(s.get('cpu_per_unit'))} {unit} | {vs_direct} | {fmt(s.get('overhead_per_unit'))} | {fmt(ratio)}× | {rounds_text} | {fmt(s.get('proc_cpu_per_unit'))} | {lat} |")
    if "stalled-readers" in summary:
        for name in ("direct", "l4lb", "l4lb-baseline", "l4lb-observed", "haproxy", "haproxy-splice", "nginx"):
            s = summary["stalled-readers"].get(name)
            if not s:
                continue
            errors = f" (errors: {s['errors'].strip()})" if s.get("errors", "").strip() else ""
            lines.append(f"| stalled-readers | {name} | {(s.get('rate') or 0) / 1000:.1f}k req/s beside {int(s['stalled'])} stalled{errors} | | | | | | | "
                         f"{fmt(s.get('p50_ms'))} / {fmt(s.get('p99_ms'))} |")
    if "idle-memory" in summary:
        for name, s in summary["idle-memory"].items():
            lines.append(f"| idle-memory | {name} | {int(s['units'])} conns | {s['bytes_per_conn']:.0f} bytes/conn RSS | | | | | | |")
    table = "\n".join(lines)
    print(table)
    chart = draw_chart(summary, RESULTS / f"bench-{stamp}.png")
    header = (f"# Benchmark results\n\nLatest run: {info['date']}, {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}; "
              f"HAProxy {info['haproxy']}, nginx {info['nginx']}, wrk {info['wrk']}, iperf3 {info['iperf3']}. "
              f"{rounds} round(s) × {duration} s per run, medians; proxies pinned to CPU {PROXY_CPU} with one worker, "
              f"backends and load on CPU {LOAD_CPU}. Took {elapsed:.0f} s. Reproduce: `scripts/bench` (`--quick` for a short run).\n\n"
              "Machine CPU per unit = busy CPU time on all CPUs (/proc/stat) / units served; `vs direct` = the rate and that "
              "CPU over the direct run's (client straight to backend); overhead = that CPU minus the direct "
              "run's; `vs HAProxy best` = l4lb's (or a peer's) overhead over the lower of HAProxy's two modes (lower is better), "
              "from the medians; `per round` = the same ratio within each round (runs minutes apart at most), which shows the spread. "
              "Process CPU = the proxy process's own utime+stime per unit.\n\n")
    results_md = ROOT / "bench" / "RESULTS.md"
    previous = results_md.read_text() if results_md.exists() else ""
    notes = previous[previous.index(NOTES_MARKER):] if NOTES_MARKER in previous else ""
    chart_line = f"\nChart: `bench/results/{chart.name}` (not committed).\n" if chart else ""
    results_md.write_text(header + table + "\n" + chart_line + ("\n" + notes if notes else ""))
    log(f"bench: wrote {RESULTS}/bench-{stamp}.json, bench/RESULTS.md" + (f", {chart}" if chart else ""))


def draw_chart(summary, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("bench: matplotlib missing, no chart (scripts/bootstrap --bench installs it)")
        return None
    workloads = [w for w in ("rr-keepalive", "conn-rate", "bulk-1", "bulk-4") if w in summary]
    if not workloads and "idle-memory" not in summary:
        return None
    proxies = ["l4lb", "haproxy", "haproxy-splice", "nginx"]
    fig, axes = plt.subplots(1, len(workloads) + ("idle-memory" in summary), figsize=(4 * (len(workloads) + 1), 4))
    if not hasattr(axes, "__len__"):
        axes = [axes]
    for ax, w in zip(axes, workloads):
        vals = [summary[w].get(p, {}).get("overhead_per_unit") or 0 for p in proxies]
        ax.bar(proxies, vals, color=["#2a7", "#c44", "#e88", "#48c"])
        ax.set_title(f"{w}\noverhead {WORKLOADS[w][1]} (lower is better)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    if "idle-memory" in summary:
        ax = axes[-1]
        vals = [summary["idle-memory"].get(p, {}).get("bytes_per_conn") or 0 for p in proxies]
        ax.bar(proxies, vals, color=["#2a7", "#c44", "#e88", "#48c"])
        ax.set_title("idle memory\nbytes RSS per connection", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


if __name__ == "__main__":
    main()
