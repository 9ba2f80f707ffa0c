#!/usr/bin/env python3
"""Many concurrent TCP connections, for the kernel forwarding scale test (issue 35, must-show 5).

One process holds at most what its descriptor limit allows, so the test runs several:

  many_flows.py serve --host H --port P
      echoes every connection on H:P (SO_REUSEPORT), until SIGTERM.
  many_flows.py open --source S --host H --port P --count N
      opens N connections from address S, echoes 64 bytes of its own pattern on each and
      prints {"opened", "failed", "seconds"}; then holds them all open, silent. SIGUSR1 echoes
      on every one again and prints {"echoed", "failed", "seconds"}; SIGTERM closes them and exits.

Every line printed is one JSON object, flushed at once."""
import argparse, asyncio, json, os, signal, socket, sys, time


IP_BIND_ADDRESS_NO_PORT = 24  # <linux/in.h>


def pattern(index: int, round_: int) -> bytes:
    return bytes((index * 7 + round_ * 13 + k) & 0xFF for k in range(64))


def report(**fields):
    print(json.dumps(fields), flush=True)


async def serve(args):
    async def echo(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        writer.close()

    server = await asyncio.start_server(echo, args.host, args.port, reuse_port=True, backlog=4096)
    report(listening=args.port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    os._exit(0)  # thousands of open echoes: no orderly teardown needed


async def echo_once(stream, index, round_, timeout):
    reader, writer = stream
    data = pattern(index, round_)
    writer.write(data)
    await writer.drain()
    received = await asyncio.wait_for(reader.readexactly(len(data)), timeout)
    return received == data


async def open_many(args):
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(args.concurrency)
    streams = [None] * args.count
    errors = {}

    def failed(error):
        errors[type(error).__name__ + ": " + str(error)] = errors.get(type(error).__name__ + ": " + str(error), 0) + 1
        return False

    async def connect():
        # The port comes with connect(), not bind(): bind(ADDRESS, 0) looks for a port free
        # for every destination and slows down as thousands are taken.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setblocking(False)
        try:
            sock.bind((args.source, 0))
            await loop.sock_connect(sock, (args.host, args.port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def open_one(index):
        async with gate:
            try:
                streams[index] = await asyncio.wait_for(connect(), args.timeout)
                return await echo_once(streams[index], index, 0, args.timeout)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as error:
                return failed(error)

    async def echo_all(round_):
        async def one(index):
            async with gate:
                if streams[index] is None:
                    return False
                try:
                    return await echo_once(streams[index], index, round_, args.timeout)
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as error:
                    return failed(error)
        return await asyncio.gather(*(one(i) for i in range(args.count)))

    start = time.monotonic()
    results = await asyncio.gather(*(open_one(i) for i in range(args.count)))
    report(opened=sum(results), failed=args.count - sum(results), seconds=round(time.monotonic() - start, 2), errors=errors)

    rounds = asyncio.Queue()
    loop.add_signal_handler(signal.SIGUSR1, rounds.put_nowait, "echo")
    loop.add_signal_handler(signal.SIGTERM, rounds.put_nowait, "close")
    round_ = 0
    while await rounds.get() == "echo":
        round_ += 1
        start = time.monotonic()
        results = await echo_all(round_)
        report(echoed=sum(results), failed=args.count - sum(results), seconds=round(time.monotonic() - start, 2), errors=errors)
    for stream in streams:
        if stream is not None:
            stream[1].transport.abort()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "open"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--source")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=10)
    args = parser.parse_args()
    asyncio.run(serve(args) if args.mode == "serve" else open_many(args))


if __name__ == "__main__":
    sys.exit(main())
