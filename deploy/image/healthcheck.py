"""The image's health check: is the gateway in this container ready?

Reads the address the gateway wrote to ``$TURNOUT_STATE_DIR/gateway.json`` (so ports set by
flag, file or variable are all found) and asks ``/v2/health/ready``. With TLS the server's
certificate is not checked (this is the container asking itself); with client certificates
required (``TURNOUT_TLS_CLIENT_CA_FILE``) a probe has none to show, so an accepted TCP
connection is taken as the answer. Exits 0 when ready, 1 otherwise. Standard library only:
it runs on the image's system Python.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

TIMEOUT_S = 3.0


def gateway_http_address(state_dir: Path) -> str:
    address = json.loads((state_dir / "gateway.json").read_text(encoding="utf-8"))["http"]
    if not isinstance(address, str):
        raise ValueError(f"no HTTP address in {state_dir / 'gateway.json'}")
    return address


def ready(address: str, mutual_tls: bool) -> bool:
    parts = urllib.parse.urlsplit(address)
    if mutual_tls:
        with socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT_S):
            return True
    context = None
    if parts.scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    url = f"{address}/v2/health/ready"
    with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as response:
        return int(response.status) == 200


def main() -> int:
    state_dir = Path(os.environ.get("TURNOUT_STATE_DIR") or "/var/lib/turnout")
    try:
        address = gateway_http_address(state_dir)
        ok = ready(address, mutual_tls=bool(os.environ.get("TURNOUT_TLS_CLIENT_CA_FILE")))
    except (OSError, ValueError, KeyError, urllib.error.URLError) as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1
    print("ready" if ok else "not ready")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
