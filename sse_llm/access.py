"""Access control (SPEC 8): an API key for programs, a session cookie for browsers.

With SSE_LLM_API_KEY set, every route but /healthz (and the login page with its static
files) needs `Authorization: Bearer <key>` or the signed session cookie that /login
sets. The cookie is HttpOnly and SameSite=Strict (so EventSource works and other sites
cannot use it), Secure over HTTPS, and expires. Keys and signatures are compared in
constant time. Requests that change something with the cookie must come from this
origin (CSRF).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import parse_qs, quote, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sse_llm.dashboard import render

COOKIE_NAME = "sse_llm_session"
SESSION_SECONDS = 7 * 24 * 3600
_OPEN_PATHS = ("/healthz", "/login")
_OPEN_PREFIXES = ("/static/",)
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _unauthorized(message: str) -> JSONResponse:
    body = {"error": {"code": "unauthorized", "message": message}}
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def _forbidden(message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": "forbidden", "message": message}}, status_code=403)


class Sessions:
    """Signs and checks session tokens: `<expiry>.<HMAC of expiry>`, keyed by the API key."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key.encode()
        # Derived from the key: rotating the key signs everybody out.
        self._secret = hashlib.sha256(b"sse-llm session\0" + self._api_key).digest()

    def key_matches(self, candidate: str) -> bool:
        """Constant-time comparison with the configured key."""
        return hmac.compare_digest(candidate.encode(), self._api_key)

    def issue(self, now: float | None = None) -> str:
        """A new session token valid for SESSION_SECONDS."""
        expiry = str(int((time.time() if now is None else now) + SESSION_SECONDS))
        return f"{expiry}.{self._sign(expiry)}"

    def valid(self, token: str, now: float | None = None) -> bool:
        """Whether a token was signed by us and has not expired."""
        expiry, _, signature = token.partition(".")
        if not expiry.isdigit() or not hmac.compare_digest(signature, self._sign(expiry)):
            return False
        return int(expiry) > (time.time() if now is None else now)

    def _sign(self, expiry: str) -> str:
        return hmac.new(self._secret, expiry.encode(), hashlib.sha256).hexdigest()


class AccessControl:
    """ASGI middleware: lets a request through only with the key or a valid session."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.sessions = Sessions(api_key) if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.sessions is None or _is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        bearer = _bearer(request)
        if bearer is not None:
            if self.sessions.key_matches(bearer):
                await self.app(scope, receive, send)
                return
            await _unauthorized("The API key is wrong.")(scope, receive, send)
            return
        token = request.cookies.get(COOKIE_NAME)
        if token is not None and self.sessions.valid(token):
            if request.method not in _SAFE_METHODS and not same_origin(request):
                await _forbidden("Cross-site request refused.")(scope, receive, send)
                return
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


def same_origin(request: Request) -> bool:
    """Whether Origin (or, lacking it, Referer) names this very host."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source:
        return False
    origin = urlsplit(source)
    return origin.netloc == request.headers.get("host") and origin.scheme in ("http", "https")


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
    if not request.app.state.settings.api_key:
        return RedirectResponse("/", status_code=303)
    context = {"next": safe_next(request.query_params.get("next")), "error": None}
    return render(request, "login.html", context)


async def login(request: Request) -> Response:
    """POST /login: check the key, set the session cookie, go back where the user was."""
    api_key = request.app.state.settings.api_key
    if not api_key:
        return RedirectResponse("/", status_code=303)
    form = await read_form(request)
    target = safe_next(form.get("next"))
    if request.headers.get("origin") and not same_origin(request):
        return _forbidden("Cross-site sign-in refused.")
    sessions = Sessions(api_key)
    if not sessions.key_matches(form.get("key", "")):
        context = {"next": target, "error": "That key is not right."}
        return render(request, "login.html", context, status_code=401)
    response = RedirectResponse(target, status_code=303)
    session_cookie(response, request, sessions.issue())
    return response


async def logout(request: Request) -> Response:
    """POST /logout: forget the session cookie."""
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
    return response


routes = [
    Route("/login", login_page, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
]
