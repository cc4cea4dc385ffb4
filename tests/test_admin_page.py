"""The operator's page /admin in Chromium: sign in with an admin token, see spend and keys, create, edit and revoke a
key; without an admin token nothing of it answers. Its screenshot in the README comes from here."""

from __future__ import annotations

import json
import os
import re

import pytest
from flask import Flask

from chatproxy import create_app
from chatproxy.callers import hash_token
from chatproxy.demo.upstream import Reply
from chatproxy.state import state
from tests.helpers import ROOT

pytestmark = pytest.mark.browser

ADMIN = "cpx_admin-token-for-the-admin-page-01"
OTHER = "cpx_not-an-admin-token-0123456789"
TOKEN_LINE = re.compile(r"shown once\): (cpx_\S+)")
SHOT = ROOT / "docs" / "screenshot-admin.png"


@pytest.fixture
def app(settings_for, fake) -> Flask:
    fake.for_model("gpt-4o-mini", Reply(content="x" * 4000))
    return create_app(
        settings_for(
            CHATPROXY_ALLOW_ANONYMOUS=False,
            CHATPROXY_API_TOKENS=f"ops={hash_token(ADMIN)},app={hash_token(OTHER)}",
            CHATPROXY_ADMIN_TOKENS="ops",
            CHATPROXY_KEY_CACHE_SECONDS=0,
            CHATPROXY_DAILY_BUDGET_USD="5",
        )
    )


def ask(app: Flask, token: str):
    return app.test_client().post("/api/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {token}"})


def sign_in(page, url: str, token: str) -> None:
    page.goto(url + "/admin")
    page.fill("#token", token)
    page.click("button[type=submit]")


def test_an_operator_signs_in_sees_spend_and_manages_keys(app, serve, page) -> None:
    made = app.test_cli_runner().invoke(args=["keys", "create", "web", "--owner", "Web team", "--daily-usd", "2"])
    web = TOKEN_LINE.search(made.output).group(1)
    assert ask(app, web).status_code == 200
    url = serve(app)

    sign_in(page, url, OTHER)  # a token, but not an admin's
    assert page.locator("#sign-in-error").text_content() == "That is not an admin token."
    assert page.locator("#keys").count() == 0

    sign_in(page, url, ADMIN)
    row = page.locator("#keys tbody tr[data-name=web]")
    row.locator(".status").wait_for()
    assert row.locator(".status").text_content() == "active"
    assert row.locator(".owner").text_content() == "Web team"
    assert page.locator("#spend-today").text_content().startswith("$")
    assert page.locator("#caps tbody tr").first.locator("td").first.text_content() == "global"
    assert "web: " not in page.locator("#end-users").text_content()  # no end users yet
    for chart in page.locator("img.chart").all():
        assert chart.evaluate("img => img.complete && img.naturalWidth > 0")

    page.fill("#new-name", "mobile")
    page.fill("#new-models", "gpt-4o-mini")
    page.fill("#new-daily", "1.5")
    page.click("#create-key button[type=submit]")
    shown = page.locator("#new-token")
    shown.wait_for()
    mobile = TOKEN_LINE.search(shown.text_content()).group(1)
    assert ask(app, mobile).status_code == 200

    row.locator(".daily").fill("0.5")
    with page.expect_response(lambda response: response.request.method == "PATCH") as saved:
        row.locator(".save").click()
    assert saved.value.status == 200 and state(app).keys.get("web").daily_micros == 500_000

    page.locator("#keys tbody tr[data-name=mobile] .revoke").click()
    page.locator("#keys tbody tr[data-name=mobile] .status", has_text="revoked").wait_for()
    assert ask(app, mobile).get_json()["error"]["code"] == "key_revoked"
    assert page.locator("#failure").is_hidden()

    page.set_viewport_size({"width": 1280, "height": 1100})
    (ROOT / "artifacts").mkdir(exist_ok=True)
    page.screenshot(path=str(ROOT / "artifacts" / "admin.png"), full_page=True)
    if os.environ.get("CHATPROXY_UPDATE_SCREENSHOTS") or not SHOT.exists():
        page.screenshot(path=str(SHOT), full_page=True)
        assert SHOT.stat().st_size > 10_000
    assert page.seen.console_errors == []


def test_nothing_of_the_admin_page_answers_without_an_admin_session(app, serve, page) -> None:
    client = app.test_client()
    assert client.get("/admin/chart.svg").status_code == 403
    html = client.get("/admin").get_data(as_text=True)
    assert 'id="token"' in html and "keys" not in html.lower().split("<body>")[1].split("</form>")[0]
    csrf = re.search(r'name="csrf" value="([^"]+)"', html).group(1)
    refused = client.post("/admin/sign-in", data={"token": ADMIN}, follow_redirects=True)  # no CSRF token
    assert "security token is missing or wrong" in refused.get_data(as_text=True)
    for token in (OTHER, "cpx_wrong"):
        refused = client.post("/admin/sign-in", data={"token": token, "csrf": csrf}, follow_redirects=True)
        assert "That is not an admin token." in refused.get_data(as_text=True)
        assert 'id="keys"' not in refused.get_data(as_text=True)
    assert client.get("/api/admin/overview", headers={"X-CSRF-Token": csrf}).status_code == 403  # a page session
    assert client.get("/api/admin/overview").get_json()["error"]["code"] == "forbidden"

    signed = client.post("/admin/sign-in", data={"token": ADMIN, "csrf": csrf})
    assert (signed.status_code, signed.headers["Location"]) == (303, "/admin")
    assert client.get("/api/admin/overview").status_code == 200
    fresh = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/admin").get_data(as_text=True)).group(1)
    assert client.post("/api/admin/keys", json={"name": "x"}).get_json()["error"]["code"] == "csrf_failed"
    assert client.post("/api/admin/keys", json={"name": "x"}, headers={"X-CSRF-Token": fresh}).status_code == 201
    client.post("/admin/sign-out", data={"csrf": fresh})
    assert client.get("/api/admin/keys").status_code == 403
    assert json.loads(app.test_client().get("/api/admin/keys").get_data())["error"]["code"] == "unauthorized"
