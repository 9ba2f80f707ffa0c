#!/usr/bin/env python3
"""An HTTPS request whose ClientHello leaves in 1-byte TCP segments (TCP_NODELAY, a
0.2 ms apart), then a normal handshake: prints the response body."""
import socket, ssl, sys, time, argparse

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--cafile", required=True)
parser.add_argument("--servername", required=True)
args = parser.parse_args()

context = ssl.create_default_context(cafile=args.cafile)
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = context.wrap_bio(incoming, outgoing, server_hostname=args.servername)
sock = socket.create_connection(("127.0.0.1", args.port), timeout=10)
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
first = True

def flush():
    global first
    data = outgoing.read()
    if first and data:
        first = False
        for byte in data:
            sock.sendall(bytes([byte]))
            time.sleep(0.0002)
    elif data:
        sock.sendall(data)

def pump(operation):
    while True:
        try:
            result = operation()
            flush()
            return result
        except ssl.SSLWantReadError:
            flush()
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during TLS")
            incoming.write(chunk)

pump(tls.do_handshake)
pump(lambda: tls.write(f"GET / HTTP/1.0\r\nHost: {args.servername}\r\n\r\n".encode()))
response = b""
while True:
    try:
        chunk = pump(lambda: tls.read(65536))
    except (ConnectionError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
        break
    if not chunk:
        break
    response += chunk
print(response.split(b"\r\n\r\n", 1)[-1].decode(), end="")
