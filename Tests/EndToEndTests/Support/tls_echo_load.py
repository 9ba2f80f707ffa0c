#!/usr/bin/env python3
"""TLS load for the end-to-end tests: N concurrent TLS connections, each sends B bytes of
a per-connection pattern and reads them back, byte-exact. Prints one JSON line."""
import asyncio, json, ssl, sys, argparse, hashlib

def pattern(seed: int, size: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest()
    while len(out) < size:
        out += block
        block = hashlib.sha256(block).digest()
    return bytes(out[:size])

async def one(i, args, context, result):
    data = pattern(i + 1, args.bytes)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            args.host, args.port, ssl=context, server_hostname=args.servername), args.timeout)
        async def send():
            for off in range(0, len(data), 65536):
                writer.write(data[off:off + 65536])
                await writer.drain()
        sender = asyncio.ensure_future(send())
        received = bytearray()
        while len(received) < len(data):
            chunk = await reader.read(262144)
            if not chunk:
                break
            received += chunk
        await sender
        writer.close()
        if bytes(received) == data:
            result["completed"] += 1
        else:
            result["mismatched"] += 1
            result["failed"].append(f"{i}: {len(received)} of {len(data)} bytes")
    except Exception as e:  # noqa: BLE001 - every failure is reported
        result["failed"].append(f"{i}: {type(e).__name__}: {e}")

async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--bytes", type=int, default=1 << 20)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--servername", required=True)
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    context = ssl.create_default_context(cafile=args.cafile)
    result = {"completed": 0, "mismatched": 0, "failed": []}
    await asyncio.wait_for(asyncio.gather(*(one(i, args, context, result) for i in range(args.connections))), args.timeout)
    result["failed"] = result["failed"][:10]
    print(json.dumps(result))

asyncio.run(main())
