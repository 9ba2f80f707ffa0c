#!/usr/bin/env python3
"""Holds COUNT connections to HOST:PORT for SECONDS, as an attacker of the admin API would,
a third of each: idle (nothing sent), slow-body (a POST head announcing 60 KB, under the
API's body limit, then 16 bytes each second) and oversized (a head announcing 100 MB, then
the same drip). Whatever the server closes is opened again until the time is up.
Prints one JSON line: connections opened, closed by the server, and the most held at once.
Bounded in count and time; loopback only."""
import errno, json, selectors, socket, sys, time

host, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
assert host.startswith("127.") or host == "::1", "loopback only"
HEADS = [None,
         b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 60000\r\nConnection: close\r\n\r\n",
         b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000\r\nConnection: close\r\n\r\n"]
LINGER_RESET = __import__("struct").pack("ii", 1, 0)
sel = selectors.DefaultSelector()
state = {}
opened = closed = held_max = 0
deadline = time.monotonic() + seconds


def open_one(i):
    global opened
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect((host, port))
    except BlockingIOError:
        pass
    except OSError:
        s.close()
        return
    opened += 1
    state[s] = {"head": HEADS[i % 3], "sent_head": False}
    sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)


for i in range(count):
    open_one(i)
last_drip = time.monotonic()
while time.monotonic() < deadline:
    for key, events in sel.select(timeout=0.2):
        s = key.fileobj
        st = state[s]
        if events & selectors.EVENT_READ:
            try:
                data = s.recv(65536)
            except (ConnectionResetError, ConnectionRefusedError, TimeoutError, OSError):
                data = b""
            if not data:
                sel.unregister(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                s.close()
                del state[s]
                closed += 1
                if time.monotonic() < deadline:
                    open_one(opened)
                continue
        if events & selectors.EVENT_WRITE:
            if st["head"] and not st["sent_head"]:
                try:
                    s.send(st["head"])
                    st["sent_head"] = True
                except OSError:
                    pass
            sel.modify(s, selectors.EVENT_READ)
    held_max = max(held_max, len(state))
    now = time.monotonic()
    if now - last_drip >= 1.0:
        last_drip = now
        for s, st in list(state.items()):
            if st["head"] and st["sent_head"]:
                try:
                    s.send(b"x" * 16)
                except OSError:
                    pass
# Reset, not FIN: an orphaned socket with unsent bytes would hold this host's TCP memory
# for minutes, and the test measures l4lb's.
LINGER_RESET = __import__("struct").pack("ii", 1, 0)
for s in list(state):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    s.close()
print(json.dumps({"opened": opened, "closed_by_server": closed, "held_max": held_max}))
