"""The labelling web app (Starlette): one static page, a small JSON API, and an admin page.

Security model (docs/label.md says it for users):
- Every route needs a labeller's token: from the link's `?token=` once (then an HttpOnly, SameSite=Strict
  cookie and a redirect that drops the token from the address bar), or `Authorization: Bearer` for scripts.
- State changes made with the cookie also need the CSRF token the page gets from /api/me (an HMAC of the
  session, so it survives restarts), a JSON body, and an Origin, if sent, naming this host.
- A labeller only ever reaches their own queue and answers; admin routes need an admin token.
- Bodies over 16 KB are refused; model output is sent as JSON and put on the page with textContent only;
  a strict Content-Security-Policy forbids inline script.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from importlib import resources
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from perlhf.label.store import MAX_COMMENT, SHOWN_CHOICES, Labeller, LabelStore, StoreError

MAX_BODY = 16 * 1024
COOKIE = "perlhf_label"
COOKIE_DAYS = 30

SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                 b"img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # The login link carries the token; never send it on to another site.
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]

NO_ACCESS = """<!doctype html><html lang="en"><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>perlhf label</title>
<body style="font-family: system-ui, sans-serif; max-width: 36rem; margin: 3rem auto; padding: 0 1rem">
<h1>perlhf label</h1><p>{message}</p></body></html>"""

STATIC = {  # name: content type; read once at start, served only to signed-in labellers
    "index.html": "text/html; charset=utf-8",
    "admin.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class SecurityHeaders:
    """Adds the same headers to every response, errors included."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(db: str, labels_per_pair: int | None = None) -> Starlette:
    """The app for one database. `labels_per_pair` overrides the K that each pair got at generate time."""
    store, _ = LabelStore.open(db)
    secret = store.secret()
    files = {name: (resources.files("perlhf.label").joinpath("static", name).read_bytes(), kind)
             for name, kind in STATIC.items()}

    def csrf_token(who: Labeller) -> str:
        return hmac.new(secret, b"csrf:" + who.token_hash.encode(), hashlib.sha256).hexdigest()

    async def authenticate(request: Request) -> tuple[Labeller | None, bool]:
        """(labeller, came by header). The header wins over the cookie."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return await run_in_threadpool(store.labeller_for_token, header[7:].strip()), True
        return await run_in_threadpool(store.labeller_for_token, request.cookies.get(COOKIE)), False

    async def require(request: Request, admin: bool = False, write: bool = False) -> Labeller:
        who, by_header = await authenticate(request)
        if who is None:
            raise HttpError(401, "sign in with your personal link")
        if admin and not who.is_admin:
            raise HttpError(403, "admin token needed")
        if write and not by_header:
            check_same_origin(request)
            if not hmac.compare_digest(request.headers.get("x-csrf-token", ""), csrf_token(who)):
                raise HttpError(403, "missing or wrong CSRF token; reload the page")
        return who

    def page(name: str, admin: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            token = request.query_params.get("token")
            if token is not None:
                return await sign_in(request, token)
            who, _ = await authenticate(request)
            if who is None or (admin and not who.is_admin):
                message = "This page needs an admin link." if who else \
                    "This page needs your personal link. Ask whoever runs the labelling for one."
                return HTMLResponse(NO_ACCESS.format(message=message), status_code=403 if who else 401)
            body, kind = files[name]
            return Response(body, media_type=kind)
        return endpoint

    async def sign_in(request: Request, token: str) -> Response:
        who = await run_in_threadpool(store.labeller_for_token, token)
        if who is None:
            return HTMLResponse(NO_ACCESS.format(message="This link is not valid (any more). Ask for a new one."),
                                status_code=401)
        # Redirect to the same page without the token, so it leaves the address bar and the history.
        response = RedirectResponse(request.url.path, status_code=303)
        response.set_cookie(COOKIE, token, max_age=COOKIE_DAYS * 86400, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    async def static(request: Request) -> Response:
        await require(request)
        name = request.path_params["name"]
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
        who = await require(request)
        return JSONResponse(await state(who))

    async def answer(request: Request) -> Response:
        who = await require(request, write=True)
        body = await read_json(request)
        pair_id, choice, comment = body.get("pair_id"), body.get("choice"), body.get("comment", "")
        if not isinstance(pair_id, int) or isinstance(pair_id, bool) or pair_id < 1:
            raise HttpError(400, "pair_id must be a positive integer")
        if choice not in SHOWN_CHOICES:
            raise HttpError(400, f"choice must be one of {', '.join(SHOWN_CHOICES)}")
        if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
            raise HttpError(400, f"comment must be text of at most {MAX_COMMENT} characters")
        answer_id = await run_in_threadpool(store.answer, who, pair_id, choice, comment.strip())
        return JSONResponse({"answer_id": answer_id, **await state(who)})

    async def undo(request: Request) -> Response:
        who = await require(request, write=True)
        await read_json(request)  # only to insist on a JSON body: a cross-site form cannot send one
        pair_id = await run_in_threadpool(store.undo, who)
        previous = await run_in_threadpool(store.last_comment, who, pair_id) if pair_id else None
        return JSONResponse({"undone": pair_id, "previous": previous, **await state(who)})

    async def admin_stats(request: Request) -> Response:
        await require(request, admin=True)
        stats = await run_in_threadpool(store.stats, labels_per_pair)
        stats["export"] = (await run_in_threadpool(store.export, min_labels_of(request)))[1]
        stats["labels_per_pair"] = labels_per_pair
        return JSONResponse(stats)

    async def admin_export(request: Request) -> Response:
        await require(request, admin=True)
        records, summary = await run_in_threadpool(store.export, min_labels_of(request))
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return Response(body, media_type="application/x-ndjson", headers={
            "content-disposition": 'attachment; filename="pairs.jsonl"',
            "x-export-summary": json.dumps(summary)})

    routes = [
        Route("/", page("index.html")),
        Route("/admin", page("admin.html", admin=True)),
        Route("/static/{name}", static),
        Route("/api/me", me),
        Route("/api/next", next_pair),
        Route("/api/answer", answer, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
        Route("/api/admin/stats", admin_stats),
        Route("/api/admin/export", admin_export),
    ]
    app = Starlette(routes=routes, exception_handlers={HttpError: http_error, StoreError: http_error})
    app.add_middleware(SecurityHeaders)
    app.state.store = store
    return app


async def http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status", 400)
    return JSONResponse({"error": str(exc)}, status_code=status)


def check_same_origin(request: Request) -> None:
    """Refuse requests a browser marks as cross-site. SameSite=Strict already keeps the cookie off them;
    this is the second lock on the door."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise HttpError(403, "cross-site request refused")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise HttpError(403, "cross-origin request refused")


def min_labels_of(request: Request) -> int:
    try:
        value = int(request.query_params.get("min_labels", "1"))
    except ValueError:
        raise HttpError(400, "min_labels must be an integer") from None
    if value < 1:
        raise HttpError(400, "min_labels must be at least 1")
    return value


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object, refusing anything over MAX_BODY before reading it all."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise HttpError(415, "send application/json")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise HttpError(413, f"request body over {MAX_BODY} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise HttpError(413, f"request body over {MAX_BODY} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HttpError(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HttpError(400, "body must be a JSON object")
    return body
