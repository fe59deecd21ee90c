"""The labelling web app through HTTP (Starlette TestClient): sign-in, CSRF, limits, isolation, restart, escaping.

Sessions, links and labeller management: tests/test_label_sessions.py; bad input and fuzzing:
tests/test_label_badinput.py."""

from __future__ import annotations

import json
import re
import sqlite3
from importlib import resources

import pytest
from starlette.testclient import TestClient

from perlhf.label.app import COOKIE, MAX_BODY, create_app
from perlhf.label.store import LabelStore, Response

SCRIPT = "<script>alert(1)</script>"


def make_app(path, **options):
    """The app answering TestClient's Host, `testserver` (the real server answers loopback names)."""
    return create_app(str(path), allowed_hosts=["testserver"], **options)


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "labels.db"
    store, admin = LabelStore.open(path, create=True, durable=False)
    store.add_pair(f"Say {SCRIPT}", Response(f"{SCRIPT} & <b>bold</b>", "m"), Response("plain", "m", "/ad"))
    for i in range(4):
        store.add_pair([{"role": "user", "content": f"question {i}"}], Response(f"good {i}", "m"),
                       Response(f"bad {i}", "m", "/ad"))
    tokens = {"admin": admin, "ann": store.add_labeller("ann"), "bob": store.add_labeller("bob")}
    return path, tokens


def sign_in(client: TestClient, path, name: str):
    """Open a fresh link for `name` and press the page's button, as a person would; returns the last response."""
    store, _ = LabelStore.open(path)
    code = store.invite(name)
    page = client.get("/signin", params={"invite": code})
    assert page.status_code == 200 and f'value="{code}"' in page.text, page.text
    return client.post("/signin", data={"invite": code})


def signed_in(app, path, name: str) -> tuple[TestClient, str]:
    """A browser-like client: signs in with a link, then carries the cookie and the CSRF token."""
    client = TestClient(app)
    response = sign_in(client, path, name)
    assert response.status_code == 200 and response.url.path in ("/", "/admin") and not response.url.query
    csrf = client.get("/api/me").json()["csrf"]
    return client, csrf


def next_pair(client, csrf):
    return client.post("/api/next", json={}, headers={"X-CSRF-Token": csrf}).json()


def answer(client, csrf, pair_id, choice="left", comment="", **headers):
    return client.post("/api/answer", json={"pair_id": pair_id, "choice": choice, "comment": comment},
                       headers={"X-CSRF-Token": csrf, **headers})


def count_answers(path, live_only=True) -> int:
    con = sqlite3.connect(path)
    try:
        where = " WHERE undone_at IS NULL" if live_only else ""
        return con.execute("SELECT count(*) FROM answers" + where).fetchone()[0]
    finally:
        con.close()


def test_every_route_needs_a_sign_in(db):
    path, tokens = db
    client = TestClient(make_app(path))
    for url in ("/", "/admin", "/static/app.js", "/api/me", "/api/admin/stats", "/api/admin/export"):
        response = client.get(url)
        assert response.status_code == 401 and "error" in response.json(), url
    for url in ("/api/next", "/api/answer", "/api/undo", "/api/logout"):
        assert client.post(url, json={}).status_code == 401, url
    assert client.get("/static/style.css").status_code == 200  # the sign-in page's stylesheet is public
    assert client.get("/signin", params={"invite": "forged"}).status_code == 401
    assert client.post("/signin", data={"invite": "forged"}).status_code == 401
    # A token is a credential for scripts, never a link: in the address bar it signs nobody in.
    assert client.get("/", params={"token": tokens["ann"]}).status_code == 401
    assert client.get("/api/me", headers={"Authorization": "Bearer forged"}).status_code == 401
    client.cookies.set(COOKIE, tokens["ann"])  # nor is it a session
    assert client.get("/api/me").status_code == 401
    # A person navigating gets the message as a page, everything else as JSON.
    page = client.get("/", headers={"Accept": "text/html,*/*"})
    assert page.status_code == 401 and "needs your personal link" in page.text
    assert page.headers["content-type"].startswith("text/html")


def test_sign_in_sets_a_lax_httponly_session_cookie_and_drops_the_code(db):
    path, tokens = db
    client = TestClient(make_app(path), follow_redirects=False)
    code = LabelStore.open(path)[0].invite("ann")
    shown = client.get("/signin", params={"invite": code})
    assert shown.status_code == 200 and "signs you in as <strong>ann</strong>" in shown.text
    assert "set-cookie" not in shown.headers  # opening the link changes nothing
    response = client.post("/signin", data={"invite": code})
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "Path=/" in cookie and "Secure" not in cookie  # plain HTTP: see test_label_sessions for HTTPS
    session = cookie.split(";")[0].split("=", 1)[1]
    assert session not in (tokens["ann"], code)  # the cookie is a session id, neither token nor link
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/app.js"' in page.text
    headers = page.headers
    assert "script-src 'self'" in headers["content-security-policy"] and "unsafe-inline" not in headers[
        "content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "same-origin"
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/index.html").status_code == 404  # pages only at their routes
    assert client.get("/static/../store.py").status_code == 404


def test_state_changes_need_csrf_token_same_origin_and_json(db):
    path, tokens = db
    app = make_app(path)
    ann, csrf = signed_in(app, path, "ann")
    _, bob_csrf = signed_in(app, path, "bob")
    assert ann.get("/api/next").status_code == 405  # serving a pair claims a place: POST only
    assert ann.post("/api/next", json={}).status_code == 403  # and with the CSRF token
    pair = next_pair(ann, csrf)["pair"]["id"]
    body = {"pair_id": pair, "choice": "left"}
    refused = [
        ann.post("/api/answer", json=body),  # no CSRF token
        ann.post("/api/answer", json=body, headers={"X-CSRF-Token": "0" * 64}),
        ann.post("/api/answer", json=body, headers={"X-CSRF-Token": bob_csrf}),  # tied to the session
        ann.post("/api/answer", json=body, headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"}),
        ann.post("/api/answer", json=body, headers={"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"}),
        ann.post("/api/undo", json={}),
    ]
    assert [r.status_code for r in refused] == [403] * len(refused)
    # A cross-site HTML form can only send form encodings, never JSON.
    form = ann.post("/api/answer", data=body, headers={"X-CSRF-Token": csrf})
    assert form.status_code == 415
    assert count_answers(path) == 0
    assert answer(ann, csrf, pair, Origin="http://testserver", **{"Sec-Fetch-Site": "same-origin"}).status_code == 200
    # Scripts authenticate with a header, which browsers never attach by themselves: no CSRF token needed.
    script = TestClient(app, headers={"Authorization": f"Bearer {tokens['bob']}"})
    pair = script.post("/api/next", json={}).json()["pair"]["id"]
    assert script.post("/api/answer", json={"pair_id": pair, "choice": "tie"}).status_code == 200
    assert count_answers(path) == 2


def test_requests_are_size_limited_and_validated(db):
    path, tokens = db
    ann, csrf = signed_in(make_app(path), path, "ann")
    pair = next_pair(ann, csrf)["pair"]["id"]
    headers = {"X-CSRF-Token": csrf, "Content-Type": "application/json"}
    huge = json.dumps({"pair_id": pair, "choice": "left", "comment": "x" * MAX_BODY}).encode()
    assert ann.post("/api/answer", content=huge, headers=headers).status_code == 413

    def chunked():  # no Content-Length: the limit must hold while streaming too
        for _ in range(40):
            yield b" " * 1024

    assert ann.post("/api/answer", content=chunked(), headers=headers).status_code == 413
    bad = [
        {"pair_id": pair, "choice": "A"}, {"pair_id": pair, "choice": "a"}, {"pair_id": str(pair), "choice": "left"},
        {"pair_id": True, "choice": "left"}, {"pair_id": -1, "choice": "left"}, {"choice": "left"},
        {"pair_id": pair, "choice": "left", "comment": "x" * 2001}, {"pair_id": pair, "choice": "left", "comment": 5},
    ]
    for body in bad:
        assert ann.post("/api/answer", json=body, headers={"X-CSRF-Token": csrf}).status_code == 400, body
    assert ann.post("/api/answer", content=b"{not json", headers=headers).status_code == 400
    assert ann.post("/api/answer", content=b"[1, 2]", headers=headers).status_code == 400
    assert answer(ann, csrf, 9999).status_code == 404
    assert count_answers(path) == 0
    assert answer(ann, csrf, pair, comment="y" * 2000).status_code == 200
    assert answer(ann, csrf, pair).status_code == 409  # undo first to change an answer


def test_a_labeller_cannot_read_or_change_anothers_answers(db):
    path, tokens = db
    app = make_app(path)
    ann, ann_csrf = signed_in(app, path, "ann")
    bob, bob_csrf = signed_in(app, path, "bob")
    first = next_pair(ann, ann_csrf)["pair"]["id"]
    assert answer(ann, ann_csrf, first, "right", "ann's private note").status_code == 200
    ann_pending = next_pair(ann, ann_csrf)["pair"]["id"]
    # Bob was never served ann's pending pair: he cannot answer it.
    assert next_pair(bob, bob_csrf)["pair"]["id"] != ann_pending
    assert answer(bob, bob_csrf, ann_pending).status_code == 403
    # Bob's undo has nothing to undo and leaves ann's answer alone.
    undo = bob.post("/api/undo", json={}, headers={"X-CSRF-Token": bob_csrf}).json()
    assert undo["undone"] is None and undo["previous"] is None
    assert count_answers(path) == 1
    # Nothing bob can reach shows ann's answer or comment.
    assert "private note" not in bob.get("/api/me").text + json.dumps(next_pair(bob, bob_csrf))
    for url in ("/admin", "/api/admin/stats", "/api/admin/export"):
        assert bob.get(url).status_code == 403, url
    # Ann's own undo gives her the pair back with her previous choice and comment.
    undo = ann.post("/api/undo", json={}, headers={"X-CSRF-Token": ann_csrf}).json()
    assert undo["undone"] == first and undo["pair"]["id"] == first
    assert undo["previous"] == {"choice": "right", "comment": "ann's private note"}


def test_restarting_the_server_loses_nothing(db):
    path, tokens = db
    ann, csrf = signed_in(make_app(path), path, "ann")
    done = []
    for choice in ("left", "tie", "both_bad"):
        pair = next_pair(ann, csrf)["pair"]["id"]
        assert answer(ann, csrf, pair, choice, f"note {pair}").status_code == 200
        done.append(pair)
    before = next_pair(ann, csrf)

    restarted = TestClient(make_app(path))  # a new process would see the same file, sessions included
    restarted.cookies.set(COOKIE, ann.cookies[COOKIE])
    assert next_pair(restarted, csrf) == before  # same pending pair, same order, same progress
    assert restarted.get("/api/me").json()["csrf"] == csrf  # the page keeps working without a reload
    undo = restarted.post("/api/undo", json={}, headers={"X-CSRF-Token": csrf}).json()
    assert undo["undone"] == done[-1] and undo["progress"]["done"] == 2
    con = sqlite3.connect(path)
    rows = con.execute("SELECT pair_id, comment FROM answers WHERE undone_at IS NULL ORDER BY id").fetchall()
    assert rows == [(done[0], f"note {done[0]}"), (done[1], f"note {done[1]}")]


def test_markup_in_model_output_stays_text(db):
    path, tokens = db
    app = make_app(path)
    ann, csrf = signed_in(app, path, "ann")
    response = ann.post("/api/next", json={}, headers={"X-CSRF-Token": csrf})
    assert response.headers["content-type"] == "application/json"  # with nosniff: never rendered as HTML
    pair = response.json()["pair"]
    assert pair["prompt"] == f"Say {SCRIPT}"
    assert {pair["left"], pair["right"]} == {f"{SCRIPT} & <b>bold</b>", "plain"}
    assert SCRIPT not in ann.get("/").text  # the page is static; content only arrives as JSON
    # The page's scripts only ever use textContent.
    static = resources.files("perlhf.label").joinpath("static")
    for name in ("app.js", "admin.js", "session.js"):
        source = "\n".join(line for line in static.joinpath(name).read_text().splitlines()
                           if not line.strip().startswith("//"))  # comments may name what is avoided
        assert "textContent" in source
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", source), name
    for name in ("index.html", "admin.html"):
        assert not re.search(r"<script>|\son\w+=", static.joinpath(name).read_text()), name  # no inline script
    choice = "left" if pair["left"] == "plain" else "right"
    assert answer(ann, csrf, pair["id"], choice).status_code == 200
    admin = TestClient(app, headers={"Authorization": f"Bearer {tokens['admin']}"})
    export = admin.get("/api/admin/export")
    assert export.headers["content-type"].startswith("application/x-ndjson")
    assert json.loads(export.text.splitlines()[0]) == {"prompt": f"Say {SCRIPT}", "chosen": "plain",
                                                      "rejected": f"{SCRIPT} & <b>bold</b>"}
    assert json.loads(export.headers["x-export-summary"])["exported"] == 1


def test_admin_page_stats_and_export(db):
    path, tokens = db
    app = make_app(path, labels_per_pair=2)  # serve-time K: both labellers get the same first pair
    ann, ann_csrf = signed_in(app, path, "ann")
    bob, bob_csrf = signed_in(app, path, "bob")
    first = next_pair(ann, ann_csrf)["pair"]
    assert next_pair(bob, bob_csrf)["pair"]["id"] == first["id"]
    for client, csrf in ((ann, ann_csrf), (bob, bob_csrf)):
        shown = next_pair(client, csrf)["pair"]
        assert answer(client, csrf, shown["id"], "left" if shown["left"] == "plain" else "right").status_code == 200
    admin, _ = signed_in(app, path, "admin")  # an admin's sign-in lands on /admin
    page = admin.get("/admin")
    assert page.status_code == 200 and "/static/admin.js" in page.text
    stats = admin.get("/api/admin/stats").json()
    assert stats["answers"] == 2 and stats["pairs_complete"] == 1 and stats["labels_per_pair"] == 2
    assert stats["agreement"] == {"pairs": 1, "pairwise": 1.0, "fleiss_kappa": None}
    assert {p["name"]: p["answers"] for p in stats["labellers"]} == {"admin": 0, "ann": 1, "bob": 1}
    assert stats["export"]["exported"] == 1
    assert admin.get("/api/admin/export", params={"min_labels": 3}).text == ""
    assert admin.get("/api/admin/export", params={"min_labels": 0}).status_code == 400
    assert admin.get("/api/admin/export", params={"min_labels": "x"}).status_code == 400
