"""Links, sessions and the server around them: single-use expiring links, revocable expiring sessions, sign-out,
asking before switching account, HTTPS cookies behind a proxy, allowed hosts, 0600 files, server limits,
line separators in the export, and the migration of older databases."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import stat
import time

import httpx
import pytest
from starlette.testclient import TestClient

from perlhf.label.app import COOKIE, SECURE_COOKIE, create_app
from perlhf.label.cli import main
from perlhf.label.server import serving
from perlhf.label.store import LabelStore, Response


@pytest.fixture
def store(tmp_path):
    store, _ = LabelStore.open(tmp_path / "l.db", create=True, durable=False)
    store.add_pair("p", Response("x", "m"), Response("y", "m"))
    for name in ("ann", "mallory"):
        store.add_labeller(name)
    return store


def app_of(store, **options):
    return create_app(str(store.path), allowed_hosts=["testserver"], **options)


def me(client) -> str | None:
    response = client.get("/api/me")
    return response.json()["name"] if response.status_code == 200 else None


def test_a_link_signs_in_once_and_expires(store):
    app = app_of(store)
    code = store.invite("ann")
    browser = TestClient(app)
    for _ in range(2):  # opening it (or a link scanner fetching it) uses nothing up
        assert browser.get("/signin", params={"invite": code}).status_code == 200
    assert browser.post("/signin", data={"invite": code}).url.path == "/" and me(browser) == "ann"
    other = TestClient(app)
    assert other.get("/signin", params={"invite": code}).status_code == 401
    assert other.post("/signin", data={"invite": code}).status_code == 401 and me(other) is None
    late = store.invite("ann", hours=0.5)
    sqlite3.connect(store.path).execute("UPDATE invites SET expires_at = 1").connection.commit()  # time passes
    assert other.post("/signin", data={"invite": late}).status_code == 401
    with pytest.raises(Exception, match="positive"):
        store.invite("ann", hours=0)


def test_sessions_expire_and_end_on_sign_out_rotate_disable_remove(store):
    app = app_of(store, session_days=1)
    browser = TestClient(app)
    cookie = browser.post("/signin", data={"invite": store.invite("ann")}).history[0].headers["set-cookie"]
    assert "Max-Age=86400" in cookie
    csrf = browser.get("/api/me").json()["csrf"]
    out = browser.post("/api/logout", json={}, headers={"X-CSRF-Token": csrf})
    assert out.json() == {"signed_out": "ann"} and f'{COOKIE}=""' in out.headers["set-cookie"]
    assert me(browser) is None

    def session():
        client = TestClient(app)
        client.post("/signin", data={"invite": store.invite("ann")})
        assert me(client) == "ann"
        return client

    client = session()
    sqlite3.connect(store.path).execute("UPDATE sessions SET expires_at = 1").connection.commit()
    assert me(client) is None  # expired on the server, whatever the browser keeps
    for end in (lambda: store.sign_out("ann"), lambda: store.rotate("ann"),
                lambda: store.set_disabled("ann", True)):
        client = session()
        end()
        assert me(client) is None
        store.set_disabled("ann", False)
    client = session()
    stale = store.invite("ann")
    store.set_disabled("ann", True)
    assert client.post("/signin", data={"invite": stale}).status_code == 401  # disabling kills unused links too
    store.set_disabled("ann", False)
    client = session()
    store.remove("ann")
    assert me(client) is None


def test_switching_account_asks_first_and_a_cross_site_post_is_refused(store):
    app = app_of(store)
    browser = TestClient(app)
    browser.post("/signin", data={"invite": store.invite("ann")})
    theirs = store.invite("mallory")
    asked = browser.get("/signin", params={"invite": theirs})
    assert "You are signed in here as <strong>ann</strong>" in asked.text and 'id="stay" href="/"' in asked.text
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"},
                    {"Sec-Fetch-Site": "same-site"}):  # same-site: another port of this host
        refused = browser.post("/signin", data={"invite": theirs}, headers=headers)
        assert refused.status_code == 403 and refused.json()["error"].startswith("cross-")
    assert me(browser) == "ann" and store.labeller_for_invite(theirs).name == "mallory"
    # A own-link for the labeller who is signed in just goes on, and stays unused.
    mine = store.invite("ann")
    assert browser.get("/signin", params={"invite": mine}, follow_redirects=False).status_code == 303
    assert store.labeller_for_invite(mine) is not None
    # Pressing the button on this site switches, and ends ann's session.
    old = browser.cookies[COOKIE]
    here = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
    assert browser.post("/signin", data={"invite": theirs}, headers=here).status_code == 200
    assert me(browser) == "mallory"
    replay = TestClient(app)
    replay.cookies.set(COOKIE, old)
    assert me(replay) is None


def test_behind_https_the_cookie_is_secure_with_the_host_prefix(store):
    client = TestClient(app_of(store), base_url="https://testserver", follow_redirects=False)
    cookie = client.post("/signin", data={"invite": store.invite("ann")}).headers["set-cookie"]
    assert cookie.startswith(f"{SECURE_COOKIE}=") and "Secure" in cookie and "Path=/" in cookie
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Domain" not in cookie
    assert me(client) == "ann"


def test_a_proxy_saying_https_gets_the_secure_cookie_from_the_real_server(store):
    """uvicorn believes X-Forwarded-Proto from the addresses in --forwarded-allow-ips (loopback by default)."""
    with serving(store.path, stop_after=60) as url:
        signed = httpx.post(f"{url}/signin", data={"invite": store.invite("ann")}, timeout=10,
                            headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"})
        assert signed.status_code == 303 and signed.headers["set-cookie"].startswith(SECURE_COOKIE)
        assert "Secure" in signed.headers["set-cookie"] and "server" not in signed.headers
    with serving(store.path, stop_after=60, options=["--forwarded-allow-ips", "192.0.2.1"]) as url:
        signed = httpx.post(f"{url}/signin", data={"invite": store.invite("ann")}, timeout=10,
                            headers={"X-Forwarded-Proto": "https"})
        assert signed.headers["set-cookie"].startswith(f"{COOKIE}=")  # not from a trusted proxy: plain HTTP


def test_only_allowed_hosts_are_answered(store):
    default = TestClient(create_app(str(store.path)), base_url="http://127.0.0.1:8000")
    assert default.get("/static/style.css").status_code == 200
    for host in ("testserver", "evil.example", "127.0.0.1.evil.example"):
        response = default.get("/static/style.css", headers={"Host": host})
        assert response.status_code == 400 and response.json() == {"error": "Invalid host header"}
        assert response.headers["x-frame-options"] == "DENY" and "location" not in response.headers
    named = TestClient(create_app(str(store.path), allowed_hosts=["label.example.org"]),
                       base_url="https://label.example.org")
    assert named.get("/static/style.css").status_code == 200
    assert named.get("/static/style.css", headers={"Host": "127.0.0.1"}).status_code == 400


def test_files_are_created_0600(tmp_path, capsys):
    db = tmp_path / "new.db"
    old = os.umask(0o022)
    try:
        store, _ = LabelStore.open(db, create=True)
        store.add_pair("p", Response("x", "m"), Response("y", "m"))
        who = store.labeller_for_token(store.add_labeller("ann"))
        store.answer(who, store.next_pair(who)["id"], "left")
        for path in (db, tmp_path / "new.db-wal", tmp_path / "new.db-shm"):  # all there while a connection is open
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        out = tmp_path / "pairs.jsonl"
        assert main(["export", "--db", str(db), "--output", str(out)]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_the_export_escapes_unicode_line_separators(store, tmp_path):
    odd = "one\u2028two\u2029three\u0085four\x0bfive\x1cend"
    pair = store.add_pair(f"prompt {odd}", Response(f"chosen {odd}", "m"), Response("y", "m"))
    admin = store.labeller_for_token(store.rotate("admin"))
    while (shown := store.next_pair(admin))["id"] != pair:
        store.answer(admin, shown["id"], "tie")
    store.answer(admin, pair, "left" if shown["left"].startswith("chosen") else "right")
    out = tmp_path / "pairs.jsonl"
    assert main(["export", "--db", str(store.path), "--output", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    api = TestClient(app_of(store), headers={"Authorization": f"Bearer {store.rotate('admin')}"})
    for exported in (text, api.get("/api/admin/export").text):
        assert exported.splitlines() == exported.split("\n")[:-1]  # only \n ends a line, for any splitter
        assert [json.loads(line) for line in exported.splitlines()] == [
            {"prompt": f"prompt {odd}", "chosen": f"chosen {odd}", "rejected": "y"}]


def test_a_schema_1_database_is_migrated(tmp_path):
    db = tmp_path / "old.db"
    store, _ = LabelStore.open(db, create=True)
    token = store.add_labeller("ann")
    store.close()
    con = sqlite3.connect(db)  # make it what perlhf wrote before sessions existed
    con.executescript("DROP TABLE invites; DROP TABLE sessions; DROP TABLE admin_log; "
                      "ALTER TABLE labellers DROP COLUMN disabled_at; ALTER TABLE labellers DROP COLUMN last_seen_at; "
                      "UPDATE meta SET value = '1' WHERE key = 'schema';")
    con.close()
    again, _ = LabelStore.open(db)
    assert again.labeller_for_token(token).name == "ann"
    assert [p["name"] for p in again.labellers()] == ["admin", "ann"]
    assert again.labeller_for_invite(again.invite("ann")).name == "ann"


def test_server_limits_idle_and_slow_connections(store):
    """A connection that sends no request head, or sends it too slowly, is closed after --header-timeout; past
    --limit-concurrency connections, requests get 503."""
    with serving(store.path, stop_after=60, options=["--header-timeout", "1", "--limit-concurrency", "3"]) as url:
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        busy = httpx.get(f"{url}/static/style.css", timeout=10)
        assert busy.status_code == 503  # three idle connections hold all the places
        started = time.monotonic()
        for conn in idle:
            assert conn.recv(1) == b""  # closed by the server
        assert time.monotonic() - started < 5
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow.sendall(b"GET /static/style.css HTTP/1.1\r\n")
        time.sleep(0.6)
        slow.sendall(b"Host: 127.0.0.1\r\n")  # still trickling at the deadline
        assert slow.recv(1) == b""
        assert httpx.get(f"{url}/static/style.css", timeout=10).status_code == 200  # places free again
