"""Settings: precedence (.env < environment < test_config) and fail-fast validation naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chatproxy import SettingsError, create_app, startup
from chatproxy.config import SETTINGS, raw_settings, validate
from chatproxy.state import state
from docs.gen_settings import env_example, readme_table

ROOT = Path(__file__).resolve().parent.parent


def test_environment_wins_over_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("OPENAI_API_KEY=sk-from-dotenv\nCHATPROXY_MAX_TOKENS=100\n", encoding="utf-8")

    values = raw_settings(env_file, environ={"CHATPROXY_MAX_TOKENS": "200"})

    assert values["OPENAI_API_KEY"] == "sk-from-dotenv"
    assert values["CHATPROXY_MAX_TOKENS"] == "200"
    assert values["CHATPROXY_DEFAULT_MODEL"] == "gpt-4o-mini"


def test_test_config_wins_over_environment(monkeypatch, settings_for):
    monkeypatch.setenv("CHATPROXY_MAX_TOKENS", "200")

    app = create_app(settings_for(CHATPROXY_MAX_TOKENS=300))

    assert state(app).settings.max_tokens == 300


def test_environment_is_read_by_create_app(monkeypatch, settings_for):
    monkeypatch.setenv("CHATPROXY_MAX_MESSAGES", "7")

    app = create_app(settings_for())

    assert state(app).settings.max_messages == 7


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("CHATPROXY_MAX_TOKENS", "lots", "an integer from 1 to"),
        ("CHATPROXY_MAX_TOKENS", "0", "an integer from 1 to"),
        ("CHATPROXY_READ_TIMEOUT", "-1", "a number from"),
        ("CHATPROXY_DEMO", "maybe", "true or false"),
        ("CHATPROXY_MODELS", " , ", "comma-separated list"),
        ("CHATPROXY_DEFAULT_MODEL", "gpt-5", "one of CHATPROXY_MODELS"),
        ("OPENAI_BASE_URL", "ftp://example", "http:// or https://"),
        ("CHATPROXY_SYSTEM_PROMPT_FILE", "/no/such/file", "readable file"),
    ],
)
def test_a_bad_value_stops_start_up_naming_the_variable(settings_for, name, value, says):
    with pytest.raises(SettingsError) as excinfo:
        create_app(settings_for(**{name: value}))

    assert name in str(excinfo.value)
    assert says in str(excinfo.value)


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("CHATPROXY_API_TOKENS", "foo", "name=sha256:HEX"),
        ("CHATPROXY_API_TOKENS", "app=sha256:abcd", "name=sha256:HEX"),
        ("CHATPROXY_PRICES", "{bad", "not valid JSON"),
        ("CHATPROXY_PRICES", '{"gpt-4o": {"input": 1}}', "missing 'output'"),
    ],
)
def test_the_check_before_gunicorn_forks_refuses_what_start_up_would(name, value, says):
    """gunicorn checks the settings (in a child, before it forks workers) with startup.check, as create_app does."""
    raw = raw_settings(None, environ={"OPENAI_API_KEY": "sk-test", name: value})

    with pytest.raises(SettingsError) as excinfo:
        startup.check(raw)

    assert name in str(excinfo.value) and says in str(excinfo.value)


def test_missing_key_names_the_variable():
    with pytest.raises(SettingsError, match="OPENAI_API_KEY"):
        validate({"OPENAI_API_KEY": ""})


def test_env_example_and_readme_list_every_setting():
    """Run `python docs/gen_settings.py` after changing SETTINGS."""
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert example == env_example()
    assert readme_table() in readme
    for setting in SETTINGS:
        assert f"\n# {setting.name}=" in example or f"\n{setting.name}=" in example, setting.name


def test_wsgi_without_a_key_refuses_to_start(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}

    result = subprocess.run(
        [sys.executable, "-c", "import wsgi"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 3  # gunicorn's worker boot error: it stops instead of starting workers forever
    assert "OPENAI_API_KEY is not set" in result.stderr
    assert "Traceback" not in result.stderr
