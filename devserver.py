"""`make run`: serve the app on 127.0.0.1; with no OPENAI_API_KEY, start the offline demo upstream first.

Development only. Production runs `gunicorn wsgi:app`, which never falls back to the demo.
"""

from __future__ import annotations

import argparse
import os

from dotenv import dotenv_values

from chatproxy import ROOT, SettingsError, create_app
from chatproxy.config import raw_settings

DEMO_KEY = "sk-demo-offline-not-a-real-key"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _set_by_user(name: str) -> bool:
    """Whether the environment or .env names this setting explicitly."""
    return name in os.environ or name in dotenv_values(ROOT / ".env")


def main() -> None:
    """Parse the port, pick real or demo upstream, and serve with Flask's threaded dev server."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")))
    args = parser.parse_args()

    overrides: dict[str, object] = {}
    raw = raw_settings(ROOT / ".env")
    if args.host in LOOPBACK and raw["CHATPROXY_ALLOW_ANONYMOUS"] == "false" and not _set_by_user("CHATPROXY_ALLOW_ANONYMOUS"):
        # Only this machine can reach a loopback dev server, so plain curl works out of the box here.
        overrides["CHATPROXY_ALLOW_ANONYMOUS"] = True
        print("Dev server on loopback: anonymous API calls allowed (gunicorn wsgi:app refuses them).", flush=True)
    if not raw["OPENAI_API_KEY"].strip() and not raw["AZURE_OPENAI_ENDPOINT"].strip():  # Azure needs no OpenAI key
        from tests.fake_openai import FakeOpenAI

        fake = FakeOpenAI(demo=True).start()
        overrides.update({"OPENAI_API_KEY": DEMO_KEY, "OPENAI_BASE_URL": fake.base_url, "CHATPROXY_DEMO": True})
        print(f"No OPENAI_API_KEY set: serving the OFFLINE DEMO upstream at {fake.base_url}.\n"
              "Answers are canned echoes, not OpenAI. Put a key in .env to use the real API.", flush=True)
    try:
        app = create_app(overrides)
    except SettingsError as exc:
        raise SystemExit(f"chatproxy: {exc}") from None
    print(f"chatproxy on http://{args.host}:{args.port}/", flush=True)
    app.run(host=args.host, port=args.port, threaded=True, debug=False, use_reloader=False)


if __name__ == "__main__":
    main()
