"""Bad input gets a 4xx JSON answer with the security headers, never a 500: the inputs that once crashed the app,
then generated bodies, headers and query strings at every endpoint (hypothesis), then a real fault."""

from __future__ import annotations

import json
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from perlhf.label.app import SECURITY_HEADERS, create_app
from perlhf.label.store import LabelStore, Response

HEADER_NAMES = [name.decode() for name, _ in SECURITY_HEADERS]
ENDPOINTS = [("GET", "/"), ("GET", "/admin"), ("GET", "/signin"), ("POST", "/signin"), ("GET", "/static/app.js"),
             ("GET", "/static/style.css"), ("GET", "/api/me"), ("POST", "/api/next"), ("POST", "/api/answer"),
             ("POST", "/api/undo"), ("POST", "/api/logout"), ("GET", "/api/admin/stats"),
             ("GET", "/api/admin/export"), ("GET", "/api/nothing-here"), ("DELETE", "/api/answer")]


def make_db(path):
    store, _ = LabelStore.open(path, create=True, durable=False)
    for i in range(5):
        store.add_pair(f"p{i}", Response(f"a{i}", "m"), Response(f"b{i}", "m"))
    store.add_labeller("ann")
    return store


def browser(app, store, name="ann") -> tuple[TestClient, str]:
    client = TestClient(app, raise_server_exceptions=False, follow_redirects=False)
    assert client.post("/signin", data={"invite": store.invite(name)}).status_code == 303
    return client, client.get("/api/me").json()["csrf"]


def refused(response, status=None) -> dict:
    """A 4xx JSON answer with the security headers; returns the JSON."""
    assert 400 <= response.status_code < 500 and (status is None or response.status_code == status), \
        (response.status_code, response.text[:300])
    assert response.headers["content-type"] == "application/json", response.headers
    assert all(name in response.headers for name in HEADER_NAMES), response.headers
    return response.json()


@pytest.fixture
def signed_in(tmp_path):
    store = make_db(tmp_path / "l.db")
    app = create_app(str(tmp_path / "l.db"), allowed_hosts=["testserver"])
    client, csrf = browser(app, store)
    pair = client.post("/api/next", json={}, headers={"X-CSRF-Token": csrf}).json()["pair"]["id"]
    return client, csrf, pair, tmp_path / "l.db"


def post_json(client, url, raw: bytes, csrf, **headers):
    return client.post(url, content=raw, headers={"Content-Type": "application/json", "X-CSRF-Token": csrf, **headers})


def test_deeply_nested_json(signed_in):
    client, csrf, pair, _ = signed_in
    for depth in (1500, 5000):
        raw = b'{"pair_id": %d, "choice": "left", "comment": ' % pair + b"[" * depth + b"]" * depth + b"}"
        assert "nested too deeply" in refused(post_json(client, "/api/answer", raw, csrf), 400)["error"]
    raw = b"[" * 8000 + b"]" * 8000  # as deep as 16 KB allows, at the top
    assert refused(post_json(client, "/api/undo", raw, csrf), 400)["error"]


def test_lone_surrogate_in_the_comment(signed_in):
    client, csrf, pair, path = signed_in
    for comment in ('"\\ud800"', '"ok \\udfff"', '"\\udc00\\ud800"'):
        raw = b'{"pair_id": %d, "choice": "left", "comment": %s}' % (pair, comment.encode())
        assert "surrogate" in refused(post_json(client, "/api/answer", raw, csrf), 400)["error"]
    raw = b'{"pair_id": %d, "choice": "left", "comment": "\\ud83d\\ude00"}' % pair  # a real pair: an emoji
    assert post_json(client, "/api/answer", raw, csrf).status_code == 200
    assert sqlite3.connect(path).execute("SELECT comment FROM answers").fetchone()[0] == "\N{GRINNING FACE}"


@pytest.mark.parametrize("pair_id", [b"9223372036854775808", b"-9223372036854775809", b"9" * 5000, b"1e400",
                                     b"9223372036854775807"])
def test_huge_pair_ids(signed_in, pair_id):
    client, csrf, _, _ = signed_in
    response = post_json(client, "/api/answer", b'{"pair_id": ' + pair_id + b', "choice": "left"}', csrf)
    if pair_id == b"9223372036854775807":  # the largest SQLite integer: a valid id, just no such pair
        assert refused(response, 404)["error"] == "no pair 9223372036854775807"
    else:
        assert refused(response, 400)["error"]


@pytest.mark.parametrize("token", ["é" * 64, "\xff", "✓"])
def test_non_ascii_csrf_token(signed_in, token):
    client, csrf, pair, _ = signed_in
    for value in (token.encode("utf-8"), token.encode("utf-8", "replace")[:64]):
        response = client.post("/api/answer", json={"pair_id": pair, "choice": "left"}, headers={"X-CSRF-Token": value})
        assert "CSRF" in refused(response, 403)["error"]


@pytest.mark.parametrize("origin", ["http://[", "http://[::1", "null", "http://testserver:99999", "http://testserver/",
                                    "ftp://testserver", "http://évil"])
def test_malformed_origin_on_undo(signed_in, origin):
    client, csrf, _, _ = signed_in
    response = client.post("/api/undo", json={}, headers={"X-CSRF-Token": csrf, "Origin": origin.encode("utf-8")})
    assert "cross-origin" in refused(response, 403)["error"]
    same = client.post("/api/undo", json={}, headers={"X-CSRF-Token": csrf, "Origin": "http://testserver"})
    assert same.status_code == 200


def test_other_bad_requests(signed_in):
    client, csrf, pair, _ = signed_in
    refused(client.get("/api/next"), 405)  # state changes are POSTs
    refused(client.get("/api/nothing"), 404)
    refused(client.get("/api/me/"), 404)  # no slash redirect (it echoed the Host header)
    refused(client.post("/api/answer", content=b"\xff\xfe", headers={"Content-Type": "application/json",
                                                                      "X-CSRF-Token": csrf}), 400)
    refused(client.post("/api/answer", content=b"{}", headers={"Content-Type": "application/json",
                                                                "X-CSRF-Token": csrf, "Content-Length": "-1"}), 413)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    refused(client.post("/signin", content=b"invite=\xff", headers=form), 400)
    refused(client.post("/signin", content="&".join(f"f{i}=1" for i in range(50)), headers=form), 400)
    refused(client.get("/api/admin/stats"), 403)  # ann is no admin
    refused(client.get("/api/me", headers={"Host": "evil.example"}), 400)
    refused(client.get("/api/me", headers={"Host": "["}), 400)


def test_a_real_server_fault_is_a_500_with_headers_and_no_traceback(signed_in, caplog):
    client, csrf, pair, path = signed_in
    con = sqlite3.connect(path)
    con.execute("DROP VIEW answer_log")
    con.execute("ALTER TABLE answers RENAME TO answers_gone")  # the database broken under the running server
    con.commit()
    response = client.post("/api/answer", json={"pair_id": pair, "choice": "left"}, headers={"X-CSRF-Token": csrf})
    assert response.status_code == 500 and response.json() == {"error": "internal server error"}
    assert all(name in response.headers for name in HEADER_NAMES)
    assert "Traceback" not in response.text and "sqlite" not in response.text.lower()
    assert "internal error on POST /api/answer" in caplog.text  # the details go to the server's log


# -- generated input at every endpoint --------------------------------------------------------------------------
#
# Requests start valid (signed in as an admin, JSON, the CSRF token, a pending pair to answer) and hypothesis
# changes one part: the body's fields, the whole body, or a few headers (and the query string). Changing one
# part at a time is what lets generated values reach the deep code: a random comment only reaches SQLite with
# a valid pair_id, choice, session and CSRF token.

PENDING = object()  # replaced by the id of the pair the admin has pending
# Text with lone surrogates, which st.text() never draws, JSON can carry (as \\ud800) and UTF-8 cannot encode.
ODD_TEXT = st.lists(st.sampled_from(["a", " ", "\ud800", "\udfff", "\u2028", "é", "\x00"]), max_size=6).map("".join)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62, max_value=2**70)
                    | st.floats(allow_nan=True) | st.text(max_size=20) | ODD_TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)
FIELDS = st.fixed_dictionaries(
    {"pair_id": st.just(PENDING) | JSON, "choice": st.sampled_from(["left", "right", "tie", "both_bad"]) | JSON},
    optional={"comment": ODD_TEXT | st.text(max_size=30) | JSON, "invite": JSON, "extra": JSON})
RAW = st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()),
    st.integers(900, 8000).map(lambda n: b"[" * n + b"]" * n),  # Python's parser gives up near 1000
    st.integers(900, 8000).map(lambda n: b'{"pair_id": 1, "comment": ' + b"[" * n + b"]" * n + b"}"),
    st.integers(4000, 5000).map(lambda n: b'{"pair_id": ' + b"9" * n + b', "choice": "left"}'),
    st.binary(max_size=200),
)
HEADER_VALUE = st.text(st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=40)
HEADER = st.one_of(
    st.tuples(st.just("Content-Type"), st.sampled_from(["text/plain", "application/x-www-form-urlencoded",
                                                        "application/json; charset=utf-8"]) | HEADER_VALUE),
    st.tuples(st.just("X-CSRF-Token"), HEADER_VALUE),
    st.tuples(st.just("Origin"),
              st.sampled_from(["http://testserver", "http://[", "null", "http://evil"]) | HEADER_VALUE),
    st.tuples(st.just("Sec-Fetch-Site"), st.sampled_from(["same-origin", "cross-site", "none"]) | HEADER_VALUE),
    st.tuples(st.just("Authorization"), st.just("Bearer ") | HEADER_VALUE.map(lambda v: "Bearer " + v) | HEADER_VALUE),
    st.tuples(st.just("Accept"), st.sampled_from(["text/html", "*/*"]) | HEADER_VALUE),
    st.tuples(st.just("Cookie"), HEADER_VALUE),
    st.tuples(st.just("Host"), st.sampled_from(["testserver:80", "evil.example", "[", "[::1]:x"]) | HEADER_VALUE),
    st.tuples(st.just("Content-Length"), st.sampled_from(["-1", "x", "99999999999999999999", "0"])),
)
QUERY = st.dictionaries(st.sampled_from(["invite", "min_labels", "token"]), HEADER_VALUE | st.integers().map(str),
                        max_size=3)


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "l.db"
    store = make_db(path)
    for i in range(300):  # enough that the admin always has a pair to answer
        store.add_pair(f"more {i}", Response("x", "m"), Response("y", "m"))
    store.add_labeller("boss", is_admin=True)
    return create_app(str(path), allowed_hosts=["testserver"]), store


@pytest.mark.parametrize("method, url", ENDPOINTS)
@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data(), part=st.sampled_from(["fields", "body", "headers"]), query=QUERY)
def test_generated_requests_never_get_a_500(fuzzed_app, method, url, data, part, query):
    app, store = fuzzed_app
    client, csrf = browser(app, store, "boss")  # an admin with a live session: the most doors are open
    pending = client.post("/api/next", json={}, headers={"X-CSRF-Token": csrf}).json()["pair"]
    body = {"pair_id": pending and pending["id"], "choice": "left"}
    headers = {"Content-Type": "application/json", "X-CSRF-Token": csrf}
    if part == "fields":
        body = {k: (pending and pending["id"] if v is PENDING else v) for k, v in data.draw(FIELDS).items()}
    body = data.draw(RAW) if part == "body" else json.dumps(body).encode()
    if part == "headers":
        for name in data.draw(st.sets(st.sampled_from(list(headers)), max_size=2)):
            del headers[name]
        headers.update(data.draw(st.lists(HEADER, min_size=1, max_size=3)))
    encoded = {name: value.encode("latin-1") for name, value in headers.items()}
    response = client.request(method, url, params=query, content=body, headers=encoded)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    assert all(name in response.headers for name in HEADER_NAMES)
    if response.status_code >= 400 and "text/html" not in headers.get("Accept", ""):
        assert response.headers["content-type"] == "application/json"
        assert isinstance(response.json()["error"], str)
