#!/usr/bin/env python3
"""Helpers for the TLS workloads of bench.py.

  tls_tools.py sink --port P [--cert C --key K]   discard everything sent to P (TLS with a cert)
  tls_tools.py send --port P --seconds S            stream zeros over TLS for S seconds; print JSON
"""
import argparse, json, socket, ssl, threading, time

def sink(args):
    context = None
    if args.cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.cert, args.key)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", args.port))
    server.listen(128)
    def drain(conn):
        buffer = bytearray(1 << 20)
        try:
            if context:
                conn = context.wrap_socket(conn, server_side=True)
            while True:
                n = conn.recv_into(buffer)
                if not n:
                    break
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()
    while True:
        conn, _ = server.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()

def send(args):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = context.wrap_socket(socket.create_connection(("127.0.0.1", args.port), timeout=30), server_hostname="bench.example.test")
    chunk = memoryview(bytes(256 * 1024))
    sent, start = 0, time.time()
    deadline = start + args.seconds
    while time.time() < deadline:
        conn.sendall(chunk)
        sent += len(chunk)
    conn.close()
    elapsed = time.time() - start
    print(json.dumps({"bytes": sent, "seconds": elapsed}))

parser = argparse.ArgumentParser()
parser.add_argument("mode", choices=["sink", "send"])
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--cert")
parser.add_argument("--key")
parser.add_argument("--seconds", type=float, default=4)
args = parser.parse_args()
sink(args) if args.mode == "sink" else send(args)
