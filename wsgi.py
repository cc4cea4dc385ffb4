"""The production entry point: `gunicorn wsgi:app`. A missing OPENAI_API_KEY stops start-up; there is no demo here."""

from chatproxy import SettingsError, create_app

try:
    app = create_app()
except SettingsError as exc:
    raise SystemExit(f"chatproxy: {exc}") from None
