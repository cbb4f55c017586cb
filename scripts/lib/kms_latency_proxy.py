#!/usr/bin/env python3
"""An HTTP proxy that adds a fixed latency to every request, for benchmarking against a distant KMS, and can
inject faults.

    kms_latency_proxy.py LISTEN_PORT UPSTREAM_PORT LATENCY_MS [THROTTLE_FRACTION [HANG_KEY_ARN]]

THROTTLE_FRACTION (0 to 1) of the requests, at random, are answered with a ThrottlingException, as AWS KMS
answers a caller over its quota; requests naming HANG_KEY_ARN (KeyId, SourceKeyId or DestinationKeyId) are
never answered, as from a key (or region) that hangs.

Listens on 127.0.0.1:LISTEN_PORT. Each request (HTTP/1.1, Content-Length bodies, keep-alive on the client side)
is held for LATENCY_MS milliseconds, then sent to 127.0.0.1:UPSTREAM_PORT on a connection of its own, and the
answer relayed back. Requests run concurrently, as they would against a remote service.
"""
import asyncio
import json
import random
import sys

THROTTLE = 0.0
HANG_KEY = None
THROTTLED = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: %d\r\n"
             b"Connection: keep-alive\r\n\r\n")
THROTTLED_BODY = json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"}).encode()


def names_hung_key(body):
    if HANG_KEY is None:
        return False
    try:
        obj = json.loads(body or b"{}")
    except ValueError:
        return False
    return HANG_KEY in (obj.get("KeyId"), obj.get("SourceKeyId"), obj.get("DestinationKeyId"))


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
            if names_hung_key(body):
                await asyncio.sleep(3600)
                return
            if THROTTLE and random.random() < THROTTLE:
                writer.write(THROTTLED % len(THROTTLED_BODY) + THROTTLED_BODY)
                await writer.drain()
                continue
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
    global THROTTLE, HANG_KEY
    port, upstream, ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    if len(sys.argv) > 4:
        THROTTLE = float(sys.argv[4])
    if len(sys.argv) > 5:
        HANG_KEY = sys.argv[5]
    server = await asyncio.start_server(lambda r, w: serve(r, w, upstream, ms / 1000), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
