"""The production entry point: `gunicorn wsgi:app`. A missing OPENAI_API_KEY stops start-up; there is no demo here."""

from chatproxy import create_app

app = create_app()
