"""Who may use the console: the access token, CSRF checks on actions, response headers.

* With a token, every request needs it: ``Authorization: Bearer <token>``, or the cookie the
  console sets when the page is opened once as ``/?token=<token>`` (then redirected away, so
  the token does not stay in the address bar or the history).
* Actions are POST forms carrying a per-process CSRF value, and a POST whose ``Origin`` or
  ``Sec-Fetch-Site`` shows another site is refused.
* The Host header must name the console when it listens on loopback, so that a web page
  cannot reach it through DNS rebinding.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlencode, urlsplit

from starlette.datastructures import URL
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp

COOKIE = "rabbitflow_console"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
HEADERS = {
    # Mermaid writes <style> into its SVG; everything else is served by the console itself.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: with it browsers send "Origin: null" on the console's own form posts,
    # which the CSRF check must refuse.
    "Referrer-Policy": "same-origin",
}


class Guard:
    """The token (if any), the CSRF value of this process, and the hosts the console answers."""

    __slots__ = ("_cookie", "csrf", "hosts", "token")

    def __init__(self, token: str | None, bind_host: str) -> None:
        self.token = token or None
        self.csrf = secrets.token_urlsafe(32)
        self.hosts = LOOPBACK | {bind_host} if bind_host in LOOPBACK else None
        # The cookie holds a value derived from the token, not the token itself.
        self._cookie = _derive(token, "cookie") if token else ""

    def allows(self, request: Request) -> bool:
        """Whether the request carries the token (always true without one)."""
        if self.token is None:
            return True
        header = request.headers.get("authorization", "")
        if header.startswith("Bearer ") and _same(header[7:], self.token):
            return True
        return _same(request.cookies.get(COOKIE, ""), self._cookie)

    def host_allowed(self, request: Request) -> bool:
        if self.hosts is None:
            return True
        host = urlsplit("//" + request.headers.get("host", "")).hostname or ""
        return host in self.hosts or f"[{host}]" in self.hosts

    def csrf_ok(self, request: Request, submitted: str) -> bool:
        """A POST from the console's own page: same origin, and the form's CSRF value."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
            return False  # another site, or "null" (a sandboxed frame, a data: URL)
        return _same(submitted, self.csrf)

    def login(self, request: Request) -> Response | None:
        """``?token=`` on a GET: set the cookie and redirect to the same URL without it."""
        given = request.query_params.get("token")
        if self.token is None or given is None or request.method != "GET":
            return None
        if not _same(given, self.token):
            return None
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        target = URL(request.url.path + (f"?{urlencode(rest)}" if rest else ""))
        response = RedirectResponse(str(target), status_code=303)
        response.set_cookie(COOKIE, self._cookie, httponly=True, samesite="strict")
        return response


class GuardMiddleware(BaseHTTPMiddleware):
    """Applies :class:`Guard` to every request, static files included."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        super().__init__(app)
        self.guard = guard

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        guard = self.guard
        if not guard.host_allowed(request):
            return _secured(PlainTextResponse("unknown host", status_code=421))
        login = guard.login(request)
        if login is not None:
            return _secured(login)
        if not guard.allows(request):
            text = "token required: open the console as /?token=<token> or send a Bearer token"
            return _secured(PlainTextResponse(text, status_code=401))
        response = _secured(await call_next(request))
        static = request.url.path.startswith("/static/")
        response.headers["Cache-Control"] = "private, max-age=3600" if static else "no-store"
        return response


def _secured(response: Response) -> Response:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _derive(token: str, purpose: str) -> str:
    return hmac.new(token.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())
