#!/usr/bin/env python3
"""Helpers for the TLS workloads of bench.py.

  tls_tools.py sink --port P [--cert C --key K]   discard everything sent to P (TLS with a cert)
  tls_tools.py send --port P --seconds S            stream zeros over TLS for S seconds; print JSON

Both sit on the load CPU with the client of tls-bulk, so they are kept cheap: a plain sink
discards in the kernel (MSG_TRUNC, no copy to user space), and the sender encrypts 256 KiB
of records into a memory BIO and sends them with one call instead of one per record.
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
                    if not conn.recv_into(buffer):
                        break
            else:
                # TCP drops the bytes without copying them out.
                while conn.recv_into(buffer, 0, socket.MSG_TRUNC):
                    pass
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
    conn = socket.create_connection(("127.0.0.1", args.port), timeout=30)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="bench.example.test")
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                conn.sendall(outgoing.read())
            data = conn.recv(65536)
            if not data:
                raise SystemExit("the server closed during the handshake")
            incoming.write(data)
    conn.sendall(outgoing.read())
    chunk = memoryview(bytes(256 * 1024))
    sent, start = 0, time.time()
    deadline = start + args.seconds
    while time.time() < deadline:
        tls.write(chunk)
        conn.sendall(outgoing.read())
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
