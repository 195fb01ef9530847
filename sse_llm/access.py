"""Access control (SPEC 8): an API key for programs, a session for browsers, no CSRF.

With SSE_LLM_API_KEY set, every route but /healthz (and the login page with its static
files) needs `Authorization: Bearer <key>` or a session cookie that /login sets. Keys
are compared in constant time.

Sessions live in PostgreSQL (the `sessions` table), so they hold on every replica and a
sign-out ends them everywhere: the cookie carries a random token, the table only its
keyed SHA-256 (keyed by the API key, so a rotated key signs everybody out, and a copy of
the table signs nobody in). Every cookie request looks its row up, no cache: a revoked
session fails on the next request on any replica. The cookie is HttpOnly and
SameSite=Strict (so EventSource works and other sites cannot use it), Secure over HTTPS.

Every request that changes something and that a browser could have been made to send
from another site (it carries a cookie, a form's content type, or an Origin) must come
from this origin, with or without a key; bearer requests are exempt (no page can add
that header to a cross-site request without a CORS preflight, which is never granted).

Who reviews (SPEC 9): with a key, the name given at sign-in (kept with the session);
without one, the name a browser gave once on /reviewer, kept in its own HttpOnly,
SameSite=Strict cookie. A browser so named may only write reviews as that name; bearer
clients (and, in open mode, programs with no cookie at all) may write any name.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from urllib.parse import parse_qs, quote, unquote, urlsplit

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sse_llm import session_store
from sse_llm.contract import ErrorCode
from sse_llm.dashboard import render
from sse_llm.errors import ApiError, handle_database_error
from sse_llm.reviews import reviewer_name
from sse_llm.service import service_of
from sse_llm.session_store import Session

COOKIE_NAME = "sse_llm_session"
SESSION_SECONDS = 7 * 24 * 3600
# Open mode's "who are you?": the reviewer's name, percent-encoded (a cookie is ASCII).
REVIEWER_COOKIE = "sse_llm_reviewer"
REVIEWER_COOKIE_SECONDS = 365 * 24 * 3600
# The name a session writes reviews as when the sign-in form leaves it blank.
DEFAULT_REVIEWER = "reviewer"
_OPEN_PATHS = ("/healthz", "/login", "/logout")
_OPEN_PREFIXES = ("/static/",)
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# secrets.token_urlsafe(32) makes 43 characters; anything unlike it is not looked up.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")


def _unauthorized(message: str) -> JSONResponse:
    body = {"error": {"code": ErrorCode.UNAUTHORIZED, "message": message}}
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def _forbidden(message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": ErrorCode.FORBIDDEN, "message": message}}, status_code=403
    )


class Sessions:
    """Checks the key; starts, finds and ends the sessions of the `sessions` table."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key.encode()
        # Derived from the key: rotating the key signs everybody out.
        self._secret = hashlib.sha256(b"sse-llm session\0" + self._api_key).digest()

    def key_matches(self, candidate: str) -> bool:
        """Constant-time comparison with the configured key."""
        return hmac.compare_digest(candidate.encode(), self._api_key)

    def token_hash(self, token: str) -> bytes:
        """What the table keeps of a token: its SHA-256, keyed by the API key."""
        return hmac.new(self._secret, token.encode(), hashlib.sha256).digest()

    async def start(self, pool: AsyncConnectionPool, reviewer: str) -> str:
        """Record a new session for `reviewer`; return the token for its cookie."""
        token = secrets.token_urlsafe(32)
        await session_store.create_session(pool, self.token_hash(token), reviewer, SESSION_SECONDS)
        # Rows only accumulate through sign-ins, so each one clearing a few expired rows
        # keeps the table at the sessions of the last SESSION_SECONDS.
        await session_store.delete_expired_sessions(pool)
        return token

    async def find(self, pool: AsyncConnectionPool, token: str) -> Session | None:
        """The live session of a cookie's token, or None (unknown, expired, revoked)."""
        if not _TOKEN.fullmatch(token):
            return None
        return await session_store.find_session(pool, self.token_hash(token))

    async def end(self, pool: AsyncConnectionPool, token: str) -> None:
        """Revoke the session of a token, on every replica at once."""
        if _TOKEN.fullmatch(token):
            await session_store.revoke_session(pool, self.token_hash(token))


class AccessControl:
    """ASGI middleware: refuses cross-site changes, then lets through the key or a session.

    A signed-in request carries its `Session` as `request.state.session`.
    """

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.sessions = Sessions(api_key) if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if is_cross_site_change(request):
            message = (
                "Refused: a change sent with a cookie or a form body must come from this "
                "service's own pages (Origin). Programs send JSON, or a bearer key."
            )
            await _forbidden(message)(scope, receive, send)
            return
        if self.sessions is None or _is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        bearer = _bearer(request)
        if bearer is not None:
            if self.sessions.key_matches(bearer):
                await self.app(scope, receive, send)
                return
            await _unauthorized("The API key is wrong.")(scope, receive, send)
            return
        token = request.cookies.get(COOKIE_NAME)
        if token is not None:
            try:
                # Read at request time: the pool is built in the lifespan.
                session = await self.sessions.find(service_of(request).pool, token)
            except (psycopg.OperationalError, PoolTimeout) as exc:
                await (await handle_database_error(request, exc))(scope, receive, send)
                return
            if session is not None:
                scope.setdefault("state", {})["session"] = session
                await self.app(scope, receive, send)
                return
        await _refusal(request)(scope, receive, send)


def _refusal(request: Request) -> Response:
    """Browsers asking for a page go to the login form; everything else gets a 401."""
    wants_page = request.method == "GET" and "text/html" in request.headers.get("accept", "")
    if wants_page:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    return _unauthorized("Send Authorization: Bearer <SSE_LLM_API_KEY>, or sign in at /login.")


def _is_open(path: str) -> bool:
    return path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def is_cross_site_change(request: Request) -> bool:
    """Whether a request changes something as a browser sends it, from another origin.

    Browsers send Origin with every cross-site POST (and Referer or a cookie with most
    others); a program without cookies (curl POST /stream) sends none of them and is not
    asked for one. A form's content type alone proves nothing: from a plain client it
    gets the route's own answer (415 on the JSON routes, SPEC 6).
    """
    if request.method in _SAFE_METHODS or _has_bearer(request):
        return False
    headers = request.headers
    from_a_browser = "cookie" in headers or "origin" in headers or "referer" in headers
    return from_a_browser and not same_origin(request)


def _has_bearer(request: Request) -> bool:
    # Only Bearer: a browser may attach cached Basic credentials to a cross-site request.
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(value.strip())


def same_origin(request: Request) -> bool:
    """Whether Origin (or, lacking it, Referer) names this very host."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source:
        return False
    origin = urlsplit(source)
    host = request.headers.get("host", "").lower()
    return origin.netloc.lower() == host and origin.scheme in ("http", "https")


def safe_next(target: str | None) -> str:
    """A local path to return to after login, never another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


async def read_form(request: Request, limit: int = 8192) -> dict[str, str]:
    """A small urlencoded form body (the login form), first value of each field."""
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > limit:
            break
    fields = parse_qs(body[:limit].decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def session_cookie(response: Response, request: Request, token: str) -> None:
    """Set the session cookie with the SPEC 8 attributes."""
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=SESSION_SECONDS,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


async def login_page(request: Request) -> Response:
    """GET /login: the sign-in form (or home, when the service has no key)."""
    if not service_of(request).settings.api_key:
        return RedirectResponse("/", status_code=303)
    context = {"next": safe_next(request.query_params.get("next")), "error": None}
    return render(request, "login.html", context)


async def login(request: Request) -> Response:
    """POST /login: check the key, start a session, go back where the user was.

    Only the service's own sign-in page may post here (a browser always names its
    origin): a session started from anywhere else would be a login CSRF. Programs use
    the bearer key instead.
    """
    api_key = service_of(request).settings.api_key
    if not api_key:
        return RedirectResponse("/", status_code=303)
    if not same_origin(request):
        return _forbidden("Sign in from this service's own sign-in page.")
    form = await read_form(request)
    context = {"next": safe_next(form.get("next")), "reviewer": form.get("reviewer", "")}
    sessions = Sessions(api_key)
    if not sessions.key_matches(form.get("key", "")):
        context["error"] = "That key is not right."
        return render(request, "login.html", context, status_code=401)
    try:
        reviewer = reviewer_name(form["reviewer"]) if form.get("reviewer", "").strip() else None
    except ValueError as exc:
        context["error"] = str(exc)
        return render(request, "login.html", context, status_code=422)
    token = await sessions.start(service_of(request).pool, reviewer or DEFAULT_REVIEWER)
    response = RedirectResponse(context["next"], status_code=303)
    session_cookie(response, request, token)
    return response


async def logout(request: Request) -> Response:
    """POST /logout: end the session on every replica, and forget its cookie."""
    api_key = service_of(request).settings.api_key
    token = request.cookies.get(COOKIE_NAME)
    if api_key and token:
        await Sessions(api_key).end(service_of(request).pool, token)
    response = RedirectResponse("/login" if api_key else "/", status_code=303)
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
    return response


# --- who reviews ---


def current_reviewer(request: Request) -> str | None:
    """The name this browser reviews as: its session's (with a key) or its reviewer
    cookie's (without); None when it has given none (or is a program)."""
    session: Session | None = getattr(request.state, "session", None)
    if session is not None:
        return session.reviewer
    if service_of(request).settings.api_key:
        return None  # a bearer client: it names the reviewer in each request
    raw = request.cookies.get(REVIEWER_COOKIE)
    if not raw:
        return None
    try:
        return reviewer_name(unquote(raw, errors="strict"))
    except ValueError:  # an old or hand-edited cookie: as if there were none
        return None


def check_may_write_as(request: Request, reviewer: str) -> None:
    """Raise 403 unless this request may write as `reviewer` (SPEC 9's trust model).

    A browser with a name (session or reviewer cookie) writes only as that name; a
    bearer client writes as anyone, and so does, in open mode, a client that gave no
    name (curl: the service is open). `reviewer` is already normalised.
    """
    if _has_bearer(request):
        return
    own = current_reviewer(request)
    if own is not None and own != reviewer:
        raise ApiError(
            403,
            ErrorCode.FORBIDDEN,
            f"This browser reviews as {own!r}: it may not write as another reviewer.",
        )


def reviewer_cookie(response: Response, request: Request, reviewer: str) -> None:
    """Set open mode's reviewer cookie (HttpOnly, SameSite=Strict, like the session's)."""
    response.set_cookie(
        REVIEWER_COOKIE,
        quote(reviewer, safe=""),
        max_age=REVIEWER_COOKIE_SECONDS,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


async def reviewer_page(request: Request) -> Response:
    """GET /reviewer: "who are you?", the name this browser's reviews carry."""
    context = {
        "next": safe_next(request.query_params.get("next")),
        "reviewer": current_reviewer(request) or "",
        "signed_in": bool(service_of(request).settings.api_key),
        "error": None,
    }
    return render(request, "reviewer.html", context)


async def set_reviewer(request: Request) -> Response:
    """POST /reviewer: keep the name in this browser's cookie, go back where it was.

    Only this service's own page may post here: a name set from another site would make
    this browser write reviews under a name it never chose. With a key, the name is the
    session's (given at sign-in) and cannot be changed here.
    """
    if not same_origin(request):
        return _forbidden("Give your name from this service's own page.")
    form = await read_form(request)
    context = {
        "next": safe_next(form.get("next")),
        "reviewer": form.get("reviewer", ""),
        "signed_in": bool(service_of(request).settings.api_key),
        "error": None,
    }
    if context["signed_in"]:
        context["reviewer"] = current_reviewer(request) or ""
        context["error"] = "Your name is the one given at sign-in: sign out to change it."
        return render(request, "reviewer.html", context, status_code=409)
    try:
        name = reviewer_name(form.get("reviewer", ""))
    except ValueError as exc:
        context["error"] = str(exc)
        return render(request, "reviewer.html", context, status_code=422)
    response = RedirectResponse(str(context["next"]), status_code=303)
    reviewer_cookie(response, request, name)
    return response


routes = [
    Route("/login", login_page, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/reviewer", reviewer_page, methods=["GET"]),
    Route("/reviewer", set_reviewer, methods=["POST"]),
]
