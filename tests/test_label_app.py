"""The labelling web app through HTTP (Starlette TestClient): tokens, CSRF, limits, isolation, restart, escaping."""

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


def signed_in(app, token: str) -> tuple[TestClient, str]:
    """A browser-like client: signs in with the link, then carries the cookie and the CSRF token."""
    client = TestClient(app)
    response = client.get("/", params={"token": token})
    assert response.status_code == 200 and response.url.path == "/" and not response.url.query
    csrf = client.get("/api/me").json()["csrf"]
    return client, csrf


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


def test_every_route_needs_a_token(db):
    path, _ = db
    client = TestClient(create_app(str(path)))
    for url in ("/", "/admin", "/static/app.js", "/static/style.css", "/api/me", "/api/next", "/api/admin/stats",
                "/api/admin/export"):
        assert client.get(url).status_code == 401, url
    for url in ("/api/answer", "/api/undo"):
        assert client.post(url, json={}).status_code == 401, url
    assert client.get("/", params={"token": "forged"}).status_code == 401
    assert client.get("/api/me", headers={"Authorization": "Bearer forged"}).status_code == 401
    client.cookies.set(COOKIE, "forged")
    assert client.get("/api/next").status_code == 401


def test_sign_in_sets_a_strict_httponly_cookie_and_drops_the_token(db):
    path, tokens = db
    client = TestClient(create_app(str(path)), follow_redirects=False)
    response = client.get("/", params={"token": tokens["ann"]})
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/app.js"' in page.text
    headers = page.headers
    assert "script-src 'self'" in headers["content-security-policy"] and "unsafe-inline" not in headers[
        "content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/index.html").status_code == 404  # pages only at their routes
    assert client.get("/static/../store.py").status_code == 404


def test_state_changes_need_csrf_token_same_origin_and_json(db):
    path, tokens = db
    app = create_app(str(path))
    ann, csrf = signed_in(app, tokens["ann"])
    _, bob_csrf = signed_in(app, tokens["bob"])
    pair = ann.get("/api/next").json()["pair"]["id"]
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
    assert answer(ann, csrf, pair, Origin="http://testserver").status_code == 200
    # Scripts authenticate with a header, which browsers never attach by themselves: no CSRF token needed.
    script = TestClient(app, headers={"Authorization": f"Bearer {tokens['bob']}"})
    pair = script.get("/api/next").json()["pair"]["id"]
    assert script.post("/api/answer", json={"pair_id": pair, "choice": "tie"}).status_code == 200
    assert count_answers(path) == 2


def test_requests_are_size_limited_and_validated(db):
    path, tokens = db
    ann, csrf = signed_in(create_app(str(path)), tokens["ann"])
    pair = ann.get("/api/next").json()["pair"]["id"]
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
    app = create_app(str(path))
    ann, ann_csrf = signed_in(app, tokens["ann"])
    bob, bob_csrf = signed_in(app, tokens["bob"])
    first = ann.get("/api/next").json()["pair"]["id"]
    assert answer(ann, ann_csrf, first, "right", "ann's private note").status_code == 200
    ann_pending = ann.get("/api/next").json()["pair"]["id"]
    # Bob was never served ann's pending pair: he cannot answer it.
    assert bob.get("/api/next").json()["pair"]["id"] != ann_pending
    assert answer(bob, bob_csrf, ann_pending).status_code == 403
    # Bob's undo has nothing to undo and leaves ann's answer alone.
    undo = bob.post("/api/undo", json={}, headers={"X-CSRF-Token": bob_csrf}).json()
    assert undo["undone"] is None and undo["previous"] is None
    assert count_answers(path) == 1
    # Nothing bob can reach shows ann's answer or comment.
    for url in ("/api/me", "/api/next"):
        assert "private note" not in bob.get(url).text
    for url in ("/admin", "/api/admin/stats", "/api/admin/export"):
        assert bob.get(url).status_code == 403, url
    # Ann's own undo gives her the pair back with her previous choice and comment.
    undo = ann.post("/api/undo", json={}, headers={"X-CSRF-Token": ann_csrf}).json()
    assert undo["undone"] == first and undo["pair"]["id"] == first
    assert undo["previous"] == {"choice": "right", "comment": "ann's private note"}


def test_restarting_the_server_loses_nothing(db):
    path, tokens = db
    ann, csrf = signed_in(create_app(str(path)), tokens["ann"])
    done = []
    for choice in ("left", "tie", "both_bad"):
        pair = ann.get("/api/next").json()["pair"]["id"]
        assert answer(ann, csrf, pair, choice, f"note {pair}").status_code == 200
        done.append(pair)
    before = ann.get("/api/next").json()

    restarted = TestClient(create_app(str(path)))  # a new process would see the same file
    restarted.cookies.set(COOKIE, ann.cookies[COOKIE])
    assert restarted.get("/api/next").json() == before  # same pending pair, same order, same progress
    assert restarted.get("/api/me").json()["csrf"] == csrf  # the page keeps working without a reload
    undo = restarted.post("/api/undo", json={}, headers={"X-CSRF-Token": csrf}).json()
    assert undo["undone"] == done[-1] and undo["progress"]["done"] == 2
    con = sqlite3.connect(path)
    rows = con.execute("SELECT pair_id, comment FROM answers WHERE undone_at IS NULL ORDER BY id").fetchall()
    assert rows == [(done[0], f"note {done[0]}"), (done[1], f"note {done[1]}")]


def test_markup_in_model_output_stays_text(db):
    path, tokens = db
    app = create_app(str(path))
    ann, csrf = signed_in(app, tokens["ann"])
    response = ann.get("/api/next")
    assert response.headers["content-type"] == "application/json"  # with nosniff: never rendered as HTML
    pair = response.json()["pair"]
    assert pair["prompt"] == f"Say {SCRIPT}"
    assert {pair["left"], pair["right"]} == {f"{SCRIPT} & <b>bold</b>", "plain"}
    assert SCRIPT not in ann.get("/").text  # the page is static; content only arrives as JSON
    # The page's scripts only ever use textContent.
    static = resources.files("perlhf.label").joinpath("static")
    for name in ("app.js", "admin.js"):
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
    app = create_app(str(path), labels_per_pair=2)  # serve-time K: both labellers get the same first pair
    ann, ann_csrf = signed_in(app, tokens["ann"])
    bob, bob_csrf = signed_in(app, tokens["bob"])
    first = ann.get("/api/next").json()["pair"]
    assert bob.get("/api/next").json()["pair"]["id"] == first["id"]
    for client, csrf in ((ann, ann_csrf), (bob, bob_csrf)):
        shown = client.get("/api/next").json()["pair"]
        assert answer(client, csrf, shown["id"], "left" if shown["left"] == "plain" else "right").status_code == 200
    admin, _ = signed_in(app, tokens["admin"])
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
