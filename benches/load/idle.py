#!/usr/bin/env python3
"""Open N keep-alive TLS connections to 127.0.0.1:PORT (SNI webmail.example.net), make one
HTTP/1.1 request on each, then hold them all idle for HOLD seconds and exit.

Usage: idle.py PORT N HOLD  -- prints "open N" once every connection is up and idle.
Only ever connects to 127.0.0.1; bounded in count and time."""
import asyncio
import ssl
import sys

PORT, N, HOLD = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
HOST = "webmail.example.net"
REQ = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


async def one(ctx, sem, conns):
    async with sem:
        r, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", PORT, ssl=ctx, server_hostname=HOST), 30
        )
        w.write(REQ)
        await w.drain()
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await r.readexactly(length)
        conns.append((r, w))


async def main():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    sem = asyncio.Semaphore(200)
    conns = []
    results = await asyncio.gather(*(one(ctx, sem, conns) for _ in range(N)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, Exception)]
    print(f"open {len(conns)} failed {len(failed)}", flush=True)
    await asyncio.sleep(HOLD)
    for _, w in conns:
        w.close()


asyncio.run(main())
