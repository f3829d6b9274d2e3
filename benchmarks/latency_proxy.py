"""An HTTP proxy that adds a fixed delay to every GET: object-store latency on a local S3
server (moto answers in about a millisecond; a real bucket takes tens of ms a GET).

    python benchmarks/latency_proxy.py http://127.0.0.1:5000 --latency-ms 50   # prints its URL
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import threading
import time
import urllib.parse

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def start_latency_proxy(upstream: str, latency_s: float) -> str:
    """Serve on a free 127.0.0.1 port in daemon threads; the proxy's URL."""
    target = urllib.parse.urlsplit(upstream)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            if self.command == "GET":
                time.sleep(latency_s)  # the latency under test, not a wait for an event
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            connection.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        def log_message(self, *args) -> None:  # one line per request would drown the figures
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("upstream", help="the S3 server's URL")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()
    print(start_latency_proxy(args.upstream, args.latency_ms / 1000), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
