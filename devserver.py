"""`make run`: serve the app on 127.0.0.1; with no OPENAI_API_KEY, start the offline demo upstream first.

Development only. Production runs `gunicorn wsgi:app`, which never falls back to the demo.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket

from dotenv import dotenv_values

from chatproxy import ROOT
from chatproxy.config import raw_settings
from chatproxy.demo.app import create_dev_app

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _set_by_user(name: str) -> bool:
    """Whether the environment or .env names this setting explicitly (a commented-out line does not)."""
    return name in os.environ or name in dotenv_values(ROOT / ".env")


def check_port(host: str, port: int) -> None:
    """Exit with one line, before anything is printed or started, when we cannot listen on host:port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as werkzeug's server does
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SystemExit(
                    f"chatproxy: port {port} on {host} is already in use (another `make run`?). "
                    f"Stop that server or pick another port: PORT=8000 make run"
                ) from None
            raise SystemExit(f"chatproxy: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def main() -> None:
    """Parse the port, pick real or demo upstream, and serve with Flask's threaded dev server."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")))
    args = parser.parse_args()
    check_port(args.host, args.port)

    overrides: dict[str, object] = {}
    raw = raw_settings(ROOT / ".env")
    anonymous_unset = raw["CHATPROXY_ALLOW_ANONYMOUS"] == "false" and not _set_by_user("CHATPROXY_ALLOW_ANONYMOUS")
    if args.host in LOOPBACK and anonymous_unset:
        # Only this machine can reach a loopback dev server, so plain curl works out of the box here.
        overrides["CHATPROXY_ALLOW_ANONYMOUS"] = True
        print("Dev server on loopback: anonymous API calls allowed (gunicorn wsgi:app refuses them).", flush=True)
    app = create_dev_app(overrides, say=lambda text: print(text, flush=True))
    print(f"chatproxy on http://{args.host}:{args.port}/", flush=True)
    app.run(host=args.host, port=args.port, threaded=True, debug=False, use_reloader=False)


if __name__ == "__main__":
    main()
