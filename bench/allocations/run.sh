#!/usr/bin/env bash
# Heap allocations per proxied connection: runs l4lb (release, one worker) under the
# counting malloc for N and for 6N short echo connections and divides the difference.
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-200}
swift build -c release --product l4lb >/dev/null
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$tmp"' EXIT
gcc -O2 -shared -fPIC -I Sources/CMallocCounter/include -o "$tmp/malloc_count.so" \
  Sources/CMallocCounter/CMallocCounter.c bench/allocations/report.c
cat > "$tmp/l4lb.yaml" <<CONF
workers: 1
drain_timeout: 1s
listeners: [{ address: "127.0.0.1:18095", cluster: c }]
clusters: [{ name: c, endpoints: [{ address: "127.0.0.1:18096" }] }]
CONF
python3 - <<'PY' &
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 18096)); s.listen(512)
def echo(c):
    while (d := c.recv(65536)): c.sendall(d)
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=echo, args=(c,), daemon=True).start()
PY
count() {
  LD_PRELOAD="$tmp/malloc_count.so" .build/release/l4lb run --config "$tmp/l4lb.yaml" 2> "$tmp/log" &
  local pid=$!
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/18095) 2>/dev/null && break; sleep 0.05; done
  python3 -c "
import socket
for i in range($1):
    s = socket.create_connection(('127.0.0.1', 18095)); s.sendall(b'x' * 500); got = b''
    while len(got) < 500: got += s.recv(4096)
    s.close()"
  kill -TERM "$pid"; wait "$pid" || true
  grep -o 'malloc_count: [0-9]*' "$tmp/log" | awk '{print $2}'
}
a=$(count "$n"); b=$(count $((6 * n)))
echo "allocations: $a for $n connections, $b for $((6 * n)); per connection: $(python3 -c "print(round(($b - $a) / (5 * $n), 3))")"
