#!/usr/bin/env python3
"""An HTTP/2 client on python-h2 (Debian's python3-h2) for the translation tests: unlike curl
or a browser it can send what RFC 9113 calls malformed (connection-specific fields, a
content-length that disagrees with the DATA, crumbled cookies), so a test can see what the
gateway does with it.

Usage: h2client.py SPEC, where SPEC is JSON:
  {"port": N, "sni": NAME, "ca": PEM-FILE, "headers": [[name, value], ...],
   "data": ["text", ...], "final_empty": bool}
The headers are sent in order, as given (pseudo-headers included); each text of "data" is
one DATA frame, the last carrying END_STREAM unless "final_empty" asks for an empty DATA
frame with END_STREAM after them. Prints one JSON object: status, headers, body, and
"reset" (the RST_STREAM error code's name) or "goaway". Bounded: 10 s.
"""
import json
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events


def main():
    spec = json.loads(sys.argv[1])
    ctx = ssl.create_default_context(cafile=spec["ca"])
    ctx.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", spec["port"]), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname=spec["sni"])
    assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding="utf-8",
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )
    conn = h2.connection.H2Connection(config=config)
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    data = spec.get("data", [])
    final_empty = spec.get("final_empty", False)
    headers = [(k, v) for k, v in spec["headers"]]
    conn.send_headers(sid, headers, end_stream=not data and not final_empty)
    for i, chunk in enumerate(data):
        last = i == len(data) - 1 and not final_empty
        conn.send_data(sid, chunk.encode(), end_stream=last)
        # Each chunk in its own write, so the gateway may see them one by one.
        sock.sendall(conn.data_to_send())
        time.sleep(0.2)
    if final_empty:
        conn.send_data(sid, b"", end_stream=True)
    sock.sendall(conn.data_to_send())

    out = {"status": None, "headers": [], "body": "", "reset": None, "goaway": None}
    body = b""
    deadline = time.monotonic() + 10
    done = False
    while not done and time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        for ev in conn.receive_data(chunk):
            if isinstance(ev, h2.events.ResponseReceived):
                out["headers"] = [[k, v] for k, v in ev.headers]
                out["status"] = int(dict(ev.headers)[":status"])
            elif isinstance(ev, h2.events.TrailersReceived):
                out["trailers"] = [[k, v] for k, v in ev.headers]
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                done = True
            elif isinstance(ev, h2.events.StreamReset):
                out["reset"] = ev.error_code.name
                done = True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                out["goaway"] = ev.error_code.name
                done = True
        sock.sendall(conn.data_to_send())
    out["body"] = body.decode("utf-8", "replace")
    print(json.dumps(out))
    sock.close()


if __name__ == "__main__":
    main()
