#!/usr/bin/env python3
"""An HTTP/1.1 backend for the translation tests, on Python's own http.server (a server
nobody here wrote): it answers with the response shapes a real backend sends (several
Set-Cookie lines, hop-by-hop fields, 103 Early Hints, trailers, 100-continue) and records
every request it receives, whole or cut short, so a test can tell what reached it.

Prints `port N` on stdout once listening on 127.0.0.1; stops on SIGTERM or when stdin closes.
"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SEEN = []
SEEN_LOCK = threading.Lock()


def record(entry):
    with SEEN_LOCK:
        SEEN.append(entry)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def read_body(self):
        """The body as framed by Content-Length or chunked; None when it was cut short."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                line = self.rfile.readline()
                if not line:
                    return None
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                chunk = self.rfile.read(size + 2)
                if len(chunk) < size + 2:
                    return None
                body += chunk[:size]
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n) if n else b""
        return body if len(body) == n else None

    def send(self, status, body, headers=()):
        self.send_response_only(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self):
        path = self.path
        if path == "/__seen":
            with SEEN_LOCK:
                body = json.dumps(SEEN).encode()
            return self.send(200, body, [("Content-Type", "application/json")])
        body = self.read_body()
        if body is None:
            record({"path": path, "complete": False})
            self.close_connection = True
            return
        record({"path": path, "complete": True})
        if path.startswith("/cookies"):
            return self.send(200, b"cookies", [
                ("Set-Cookie", "sess=abc; Path=/; Secure; HttpOnly"),
                ("Set-Cookie", "tok=xyz; Expires=Wed, 09 Jun 2027 10:18:14 GMT; Path=/"),
                ("Set-Cookie", "lang=en, fr; Path=/"),
            ])
        if path.startswith("/hop"):
            return self.send(200, b"hop", [
                ("Connection", "X-Private, keep-alive"),
                ("X-Private", "secret"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Connection", "keep-alive"),
                ("Upgrade", "h2c"),
                ("X-Kept", "1"),
            ])
        if path.startswith("/early-hints"):
            self.send_response_only(103)
            self.send_header("Link", "</style.css>; rel=preload; as=style")
            self.end_headers()
            self.wfile.flush()
            return self.send(200, b"final", [("Content-Type", "text/plain")])
        if path.startswith("/te-cl"):
            # Both framings: the client must get the chunked body whole (RFC 9112 §6.3).
            self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                             b"Content-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            return
        if path.startswith("/te-gzip"):
            self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                             b"5\r\nhello\r\n0\r\n\r\n")
            return
        if path.startswith("/trailers-hop"):
            self.send_response_only(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "X-Checksum, Keep-Alive")
            self.end_headers()
            self.wfile.write(b"5\r\nhello\r\n0\r\nX-Checksum: abc123\r\nKeep-Alive: timeout=5\r\n\r\n")
            return
        if path.startswith("/trailers"):
            self.send_response_only(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "X-Checksum")
            self.end_headers()
            self.wfile.write(b"5\r\nhello\r\n0\r\nX-Checksum: abc123\r\n\r\n")
            return
        # /echo and anything else: what arrived, header lines in order.
        answer = {
            "method": self.command,
            "path": path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": len(body),
        }
        self.send(200, json.dumps(answer).encode(), [("Content-Type", "application/json")])

    do_GET = do_POST = do_PUT = do_HEAD = handle_any


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"port {server.server_address[1]}", flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # The test holds stdin open; its end (the test's end, however it ends) stops us.
    sys.stdin.read()
    server.shutdown()


if __name__ == "__main__":
    main()
