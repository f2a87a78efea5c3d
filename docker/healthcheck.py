#!/usr/bin/env python3
"""Container health check: exit 0 when the server answers 200 on /ready, else 1.

The image has Python but no curl; this uses only the standard library.
"""
import os
import sys
import urllib.request

host = os.environ.get("JANUS_HOST", "127.0.0.1")
if host in ("", "0.0.0.0", "::"):
    host = "127.0.0.1"  # a wildcard bind is reachable on loopback
elif ":" in host:
    host = f"[{host}]"
port = os.environ.get("JANUS_PORT", "8000")

# An empty ProxyHandler: an http_proxy set for downloads must not catch loopback checks.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(f"http://{host}:{port}/ready", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as error:  # refused, timed out, or 503 while loading (HTTPError)
    print(f"not ready: {error}", file=sys.stderr)
    sys.exit(1)
