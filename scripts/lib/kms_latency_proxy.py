#!/usr/bin/env python3
"""An HTTP proxy that adds a fixed latency to every request, for benchmarking against a distant KMS.

    kms_latency_proxy.py LISTEN_PORT UPSTREAM_PORT LATENCY_MS

Listens on 127.0.0.1:LISTEN_PORT. Each request (HTTP/1.1, Content-Length bodies, keep-alive on the client side)
is held for LATENCY_MS milliseconds, then sent to 127.0.0.1:UPSTREAM_PORT on a connection of its own, and the
answer relayed back. Requests run concurrently, as they would against a remote service.
"""
import asyncio
import sys


async def read_message(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return head, body


async def forward(head, body, upstream_port):
    reader, writer = await asyncio.open_connection("127.0.0.1", upstream_port)
    try:
        # One request per upstream connection: ask the server to close, and read until it does.
        lines = [l for l in head.split(b"\r\n") if not l.lower().startswith(b"connection:") and l]
        writer.write(b"\r\n".join(lines) + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        rhead = await reader.readuntil(b"\r\n\r\n")
        rbody = await reader.read()  # until the server closes
        for line in rhead.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                rbody = rbody[:int(value.strip())]
        return rhead, rbody
    finally:
        writer.close()


async def serve(reader, writer, upstream_port, latency):
    try:
        while True:
            try:
                head, body = await read_message(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            await asyncio.sleep(latency)
            try:
                rhead, rbody = await forward(head, body, upstream_port)
            except (OSError, asyncio.IncompleteReadError):
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            lines = [l for l in rhead.split(b"\r\n") if l and not l.lower().startswith((b"connection:", b"content-length:"))]
            writer.write(b"\r\n".join(lines) + b"\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n" % len(rbody) + rbody)
            await writer.drain()
    finally:
        writer.close()


async def main():
    port, upstream, ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    server = await asyncio.start_server(lambda r, w: serve(r, w, upstream, ms / 1000), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
