"""The production entry point: `gunicorn wsgi:app`. A missing OPENAI_API_KEY stops start-up; there is no demo here."""

import sys

from chatproxy import SettingsError, create_app

# gunicorn respawns a worker that exits 1 forever (a crash loop that keeps the port), but stops altogether
# when a worker exits with its boot-error code, 3. gunicorn.conf.py checks the settings before any worker
# starts, so this is the last line of defence (a setting the master could not see, or new code after a reload).
WORKER_BOOT_ERROR = 3

try:
    app = create_app()
except SettingsError as exc:
    print(f"chatproxy: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(WORKER_BOOT_ERROR) from None
