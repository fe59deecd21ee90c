"""The labelling web app (Starlette): one static page, a small JSON API, and an admin page.

Security model (docs/label.md says it for users):
- A sign-in link (`/signin?invite=CODE`) is single-use and expires. Opening it changes nothing: the page says
  whom it signs in (and whom it would sign out) and has a button; that same-origin POST uses up the code and
  opens a server-side session. Link scanners that fetch links cannot burn it, and a third-party page cannot
  switch a signed-in labeller to another account, because a cross-site POST to /signin is refused.
- The session cookie is a random session id (never a token), HttpOnly, SameSite=Lax so that a link clicked
  on another site arrives signed in, and behind HTTPS `Secure` with the `__Host-` prefix. Sessions expire and
  end on sign-out, token rotation, disable and remove. Scripts use `Authorization: Bearer TOKEN` instead.
- Every request that changes state is a POST; made with the cookie it also needs the CSRF token the page
  gets from /api/me (an HMAC of the session), a JSON body, and an Origin, if sent, equal to this origin.
- A labeller only ever reaches their own queue and answers; admin routes need an admin.
- Only the configured Host names are answered (loopback by default). Bodies over 16 KB or slower than
  BODY_SECONDS are refused. Every error is a JSON answer (an HTML page for a browser navigating), with the
  security headers, and no traceback ever reaches the client.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
from importlib import resources
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from perlhf.label.store import MAX_COMMENT, SHOWN_CHOICES, Labeller, LabelStore, StoreError, export_lines

MAX_BODY = 16 * 1024
BODY_SECONDS = 10.0  # a body must arrive within this, so slow uploads cannot hold a worker
COOKIE = "perlhf_label_session"
SECURE_COOKIE = "__Host-" + COOKIE  # over HTTPS: the browser then only keeps it if Secure, Path=/ and no Domain
SESSION_DAYS = 30.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
MAX_ID = 2**63 - 1  # SQLite's largest integer

SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                 b"img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # The sign-in link carries a code: never send it on to another site. (Not no-referrer: with that,
    # browsers send `Origin: null` on same-origin form posts, and the sign-in form's Origin is checked.)
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]

PAGE = """<!doctype html><html lang="en"><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>perlhf label</title>
<link rel="stylesheet" href="/static/style.css"><link rel="icon" href="/static/icon.svg" type="image/svg+xml">
<body><main class="notice"><h1>perlhf label</h1>{body}</main></body></html>"""

STATIC = {  # name: content type; read once at start
    "index.html": "text/html; charset=utf-8",
    "admin.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
    "session.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
PUBLIC = ("style.css", "icon.svg")  # the sign-in and error pages use them before anyone is signed in

log = logging.getLogger("perlhf.label")


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class SecurityHeaders:
    """Adds the same headers to every response, errors included, and turns the plain-text errors of
    Starlette's own middleware (TrustedHostMiddleware's "Invalid host header") into JSON like all others."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None

        async def send_with_headers(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + SECURITY_HEADERS}
                if message["status"] >= 400 and (b"content-type", b"text/plain; charset=utf-8") in message["headers"]:
                    held = message  # sent once its body is here, as JSON
                    return
            elif held is not None and message["type"] == "http.response.body":
                body = json.dumps({"error": message.get("body", b"").decode("utf-8", "replace")}).encode()
                headers = [h for h in held["headers"] if h[0] not in (b"content-type", b"content-length")]
                await send({**held, "headers": headers + [(b"content-type", b"application/json"),
                                                          (b"content-length", str(len(body)).encode())]})
                message, held = {"type": "http.response.body", "body": body}, None
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(db: str, labels_per_pair: int | None = None, allowed_hosts: list[str] | None = None,
               session_days: float = SESSION_DAYS) -> Starlette:
    """The app for one database. `labels_per_pair` overrides the K that each pair got at generate time;
    `allowed_hosts` are the Host names answered (default: loopback names); sessions last `session_days`."""
    store, _ = LabelStore.open(db)
    secret = store.secret()
    files = {name: (resources.files("perlhf.label").joinpath("static", name).read_bytes(), kind)
             for name, kind in STATIC.items()}

    def csrf_token(who: Labeller) -> str:
        return hmac.new(secret, b"csrf:" + (who.session or who.token_hash).encode(), hashlib.sha256).hexdigest()

    def cookie_name(request: Request) -> str:
        return SECURE_COOKIE if request.url.scheme == "https" else COOKIE

    async def authenticate(request: Request) -> Labeller | None:
        """The header wins over the cookie."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return await run_in_threadpool(store.labeller_for_token, header[7:].strip())
        return await run_in_threadpool(store.labeller_for_session, request.cookies.get(cookie_name(request)))

    async def require(request: Request, admin: bool = False, write: bool = False) -> Labeller:
        who = await authenticate(request)
        if who is None:
            raise HttpError(401, "sign in with your personal link")
        if admin and not who.is_admin:
            raise HttpError(403, "this needs an admin")
        if write and who.session is not None:  # a browser: a bearer token is never attached by one on its own
            check_same_origin(request)
            # As bytes: compare_digest refuses str with non-ASCII characters, which a header may hold.
            given = request.headers.get("x-csrf-token", "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, csrf_token(who).encode()):
                raise HttpError(403, "missing or wrong CSRF token; reload the page")
        return who

    def page(name: str, admin: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            who = await authenticate(request)
            if who is None:
                raise HttpError(401, "This page needs your personal link. Ask whoever runs the labelling for one.")
            if admin and not who.is_admin:
                raise HttpError(403, "This page needs an admin link.")
            body, kind = files[name]
            return Response(body, media_type=kind)
        return endpoint

    async def signin_page(request: Request) -> Response:
        """What the link opens. It changes nothing (a GET): it says whom the link signs in and asks."""
        code = request.query_params.get("invite")
        if not code:
            raise HttpError(400, "Open your personal sign-in link to sign in.")
        invited = await run_in_threadpool(store.labeller_for_invite, code)
        if invited is None:
            raise HttpError(401, "This link is not valid (any more): each link signs in once and expires. "
                                 "Ask whoever runs the labelling for a new one.")
        current = await run_in_threadpool(store.labeller_for_session, request.cookies.get(cookie_name(request)))
        if current is not None and current.id == invited.id:
            return RedirectResponse(home(current), status_code=303)  # already in; the link stays unused
        name = html.escape(invited.name)
        body = f"<p>This link signs you in as <strong>{name}</strong>. It works once.</p>"
        if current is not None:
            body = (f"<p class=\"warning\">You are signed in here as <strong>{html.escape(current.name)}</strong>. "
                    f"This link is for <strong>{name}</strong>: signing in as {name} signs "
                    f"{html.escape(current.name)} out of this browser.</p>")
        body += ("<form method=\"post\" action=\"/signin\"><input type=\"hidden\" name=\"invite\" "
                 f"value=\"{html.escape(code)}\"><button type=\"submit\" id=\"sign-in\">Sign in as {name}</button>"
                 "</form>")
        if current is not None:
            body += f"<p><a id=\"stay\" href=\"{home(current)}\">Stay signed in as {html.escape(current.name)}</a></p>"
        return HTMLResponse(PAGE.format(body=body))

    async def signin(request: Request) -> Response:
        """The button on the sign-in page: uses up the link, opens a session, sets the cookie."""
        check_same_origin(request)  # a third-party page cannot post someone else's link for the labeller
        form = await read_form(request)
        opened = await run_in_threadpool(store.sign_in, form.get("invite"), session_days)
        if opened is None:
            raise HttpError(401, "This link is not valid (any more): each link signs in once and expires. "
                                 "Ask whoever runs the labelling for a new one.")
        who, session = opened
        previous = await run_in_threadpool(store.labeller_for_session, request.cookies.get(cookie_name(request)))
        if previous is not None:
            await run_in_threadpool(store.end_session, previous.session)
        response = RedirectResponse(home(who), status_code=303)
        https = request.url.scheme == "https"
        response.set_cookie(cookie_name(request), session, max_age=int(session_days * 86400), path="/",
                            httponly=True, samesite="lax", secure=https)
        return response

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in PUBLIC:
            await require(request)
        if name not in files or name.endswith(".html"):
            raise HttpError(404, "not found")
        body, kind = files[name]
        return Response(body, media_type=kind)

    async def state(who: Labeller) -> dict[str, Any]:
        pair = await run_in_threadpool(store.next_pair, who, labels_per_pair)
        progress = await run_in_threadpool(store.progress, who, labels_per_pair)
        return {"pair": pair, "progress": progress}

    async def me(request: Request) -> Response:
        who = await require(request)
        return JSONResponse({"name": who.name, "admin": who.is_admin, "csrf": csrf_token(who)})

    async def next_pair(request: Request) -> Response:
        who = await require(request, write=True)  # a POST: serving a pair claims one of its places
        await read_json(request)
        return JSONResponse(await state(who))

    async def answer(request: Request) -> Response:
        who = await require(request, write=True)
        body = await read_json(request)
        pair_id, choice, comment = body.get("pair_id"), body.get("choice"), body.get("comment", "")
        if not isinstance(pair_id, int) or isinstance(pair_id, bool) or not 1 <= pair_id <= MAX_ID:
            raise HttpError(400, f"pair_id must be an integer from 1 to {MAX_ID}")
        if choice not in SHOWN_CHOICES:
            raise HttpError(400, f"choice must be one of {', '.join(SHOWN_CHOICES)}")
        if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
            raise HttpError(400, f"comment must be text of at most {MAX_COMMENT} characters")
        if not is_unicode(comment):
            raise HttpError(400, "comment is not valid Unicode (it has a lone surrogate)")
        answer_id = await run_in_threadpool(store.answer, who, pair_id, choice, comment.strip())
        return JSONResponse({"answer_id": answer_id, **await state(who)})

    async def undo(request: Request) -> Response:
        who = await require(request, write=True)
        await read_json(request)  # only to insist on a JSON body: a cross-site form cannot send one
        pair_id = await run_in_threadpool(store.undo, who)
        previous = await run_in_threadpool(store.last_comment, who, pair_id) if pair_id else None
        return JSONResponse({"undone": pair_id, "previous": previous, **await state(who)})

    async def logout(request: Request) -> Response:
        who = await require(request, write=True)
        await read_json(request)
        if who.session is not None:
            await run_in_threadpool(store.end_session, who.session)
        response = JSONResponse({"signed_out": who.name})
        response.delete_cookie(cookie_name(request), path="/", httponly=True, samesite="lax",
                               secure=request.url.scheme == "https")
        return response

    async def admin_stats(request: Request) -> Response:
        await require(request, admin=True)
        stats = await run_in_threadpool(store.stats, labels_per_pair)
        stats["export"] = (await run_in_threadpool(store.export, min_labels_of(request)))[1]
        stats["labels_per_pair"] = labels_per_pair
        return JSONResponse(stats)

    async def admin_export(request: Request) -> Response:
        await require(request, admin=True)
        records, summary = await run_in_threadpool(store.export, min_labels_of(request))
        return Response(export_lines(records), media_type="application/x-ndjson", headers={
            "content-disposition": 'attachment; filename="pairs.jsonl"',
            "x-export-summary": json.dumps(summary)})

    routes = [
        Route("/", page("index.html")),
        Route("/admin", page("admin.html", admin=True)),
        Route("/signin", signin_page, methods=["GET"]),
        Route("/signin", signin, methods=["POST"]),
        Route("/static/{name}", static),
        Route("/api/me", me),
        Route("/api/next", next_pair, methods=["POST"]),
        Route("/api/answer", answer, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
        Route("/api/logout", logout, methods=["POST"]),
        Route("/api/admin/stats", admin_stats),
        Route("/api/admin/export", admin_export),
    ]
    app = Starlette(routes=routes, exception_handlers={HttpError: http_error, StoreError: http_error,
                                                       HTTPException: http_error, Exception: server_error})
    app.router.redirect_slashes = False  # its redirect would echo the Host header; no route needs it
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts or LOOPBACK_HOSTS),
                       www_redirect=False)
    app.add_middleware(SecurityHeaders)  # added last, so it wraps the host check too
    app.state.store = store
    return app


def home(who: Labeller) -> str:
    return "/admin" if who.is_admin else "/"


def wants_html(request: Request) -> bool:
    """A browser navigating to a page (rather than a script or the page's fetch) gets errors as a page."""
    return "text/html" in request.headers.get("accept", "")


async def http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status", None) or getattr(exc, "status_code", 400)
    message = str(getattr(exc, "detail", None) or exc) if isinstance(exc, HTTPException) else str(exc)
    if wants_html(request):
        return HTMLResponse(PAGE.format(body=f"<p>{html.escape(message)}</p>"), status_code=status)
    return JSONResponse({"error": message}, status_code=status, headers=getattr(exc, "headers", None))


async def server_error(request: Request, exc: Exception) -> Response:
    """A real fault. This handler runs outside the middleware, so it adds the security headers itself;
    the traceback goes to the server's log only."""
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    response = JSONResponse({"error": "internal server error"}, status_code=500)
    for name, value in SECURITY_HEADERS:
        response.headers[name.decode()] = value.decode()
    return response


def check_same_origin(request: Request) -> None:
    """Refuse requests a browser marks as cross-site or cross-origin. The Origin header is compared as a string
    with this origin, never parsed: a malformed one is simply not equal."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise HttpError(403, "cross-site request refused")
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host')}":
        raise HttpError(403, "cross-origin request refused")


def is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def min_labels_of(request: Request) -> int:
    try:
        value = int(request.query_params.get("min_labels", "1"))
    except ValueError:
        raise HttpError(400, "min_labels must be an integer") from None
    if value < 1:
        raise HttpError(400, "min_labels must be at least 1")
    return value


async def read_body(request: Request) -> bytes:
    """The body, refusing anything over MAX_BODY before reading it all, or slower than BODY_SECONDS."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise HttpError(413, f"request body over {MAX_BODY} bytes")
    chunks, size = [], 0
    try:
        with anyio.fail_after(BODY_SECONDS):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY:
                    raise HttpError(413, f"request body over {MAX_BODY} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise HttpError(408, f"request body not received within {BODY_SECONDS:g} s") from None
    return b"".join(chunks)


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise HttpError(415, "send application/json")
    try:
        body = json.loads(await read_body(request) or b"{}")
    except RecursionError:
        raise HttpError(400, "body is nested too deeply") from None
    except (UnicodeDecodeError, ValueError):  # ValueError: bad JSON, or an integer of over 4300 digits
        raise HttpError(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HttpError(400, "body must be a JSON object")
    return body


async def read_form(request: Request) -> dict[str, str]:
    """A urlencoded form body (the sign-in page's), read with the standard library: one value per field."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise HttpError(415, "send application/x-www-form-urlencoded")
    try:
        fields = parse_qs((await read_body(request)).decode("utf-8"), max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "body is not a valid form") from None
    return {key: values[0] for key, values in fields.items()}
