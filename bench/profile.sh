#!/usr/bin/env bash
# Profiles l4lb under rr-keepalive (wrk -c50 through one pinned worker), or conn-rate
# (`bench/profile.sh conn-rate`: a new connection per request), with perf's software
# clock (hardware counters are not available on these machines) and prints the split by
# binary and the top symbols. See bench/PROFILE.md.
set -euo pipefail
workload=${1:-rr-keepalive}
case "$workload" in
  rr-keepalive) wrk_args=() ;;
  conn-rate) wrk_args=(-H "Connection: close") ;;
  *) echo "usage: $0 [rr-keepalive|conn-rate]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "perf missing: apt-get install linux-perf"; exit 1; }
swift build -c release --product l4lb >/dev/null
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"' EXIT
cat > "$tmp/backend.conf" <<CONF
worker_processes 1; daemon off; pid $tmp/b.pid; error_log stderr error;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000; default_type text/plain;
  server { listen 127.0.0.1:18200; location / { return 200 "hello world\n"; } } }
CONF
cat > "$tmp/l4lb.yaml" <<CONF
workers: 1
listeners: [{ address: "127.0.0.1:18210", cluster: http }]
clusters: [{ name: http, endpoints: [{ address: "127.0.0.1:18200" }] }]
CONF
taskset -c 0 nginx -e stderr -p "$tmp" -c "$tmp/backend.conf" &
sleep 0.3
taskset -c 1 .build/release/l4lb run --config "$tmp/l4lb.yaml" 2>/dev/null &
pid=$!
sleep 0.5
perf record -F 2000 -g -p "$pid" -o "$tmp/perf.data" -- sleep 8 >/dev/null 2>&1 &
taskset -c 0 wrk -t1 -c50 -d8s "${wrk_args[@]}" http://127.0.0.1:18210/ | grep -E "Requests/sec"
wait %3 2>/dev/null || sleep 1
echo "== by binary"
perf report -i "$tmp/perf.data" --no-children --sort dso --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -8
echo "== top symbols"
perf report -i "$tmp/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null | grep -E "^ +[0-9]" > "$tmp/symbols"; head -40 "$tmp/symbols"; echo "== user space"; perf report -i "$tmp/perf.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null | grep -E "^ +[0-9]" | grep -v kernel | head -25 || true; echo "== io_uring"; grep -E "io_|uring" "$tmp/symbols" | head -20
