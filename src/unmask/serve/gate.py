"""The ASGI layer in front of the routes: Host check, API-key check, content type and body size.

Runs before any body is parsed, so an unauthenticated or oversized request costs nothing. The
body is read here (up to the limit, whatever Content-Length claims) and replayed to the app.

Browsers are kept out two ways. A page on another site can POST to a loopback server, but only
as a "simple" request (``text/plain``, forms): ``/v1/*`` POSTs must be ``application/json``,
which a browser sends cross-origin only after a preflight this server never grants. A page can
also rebind its own name to 127.0.0.1 and read the answers as same-origin; its requests then
carry its own name in ``Host``, so only the names the server was bound to (and any allowed with
``allowed_hosts``) are answered.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unmask.serve.errors import APIError


class Gate:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int,
                 allowed_hosts: tuple[str, ...] | list[str] = ("*",)) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes
        self.any_host = "*" in allowed_hosts
        self.hosts = {_bare(h) for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if not self.any_host and not self._host_allowed(_host_name(headers.get("host", b""))):
            err = APIError(421, "this server does not answer to that Host header (see --allow-host)",
                           code="host_not_allowed")
            await err.response()(scope, receive, send)
            return
        if self.key is not None and scope["path"].startswith("/v1/") and not self._authorized(headers):
            err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            await err.response()(scope, receive, send)
            return
        if scope["method"] == "POST" and scope["path"].startswith("/v1/") and not _is_json(headers):
            err = APIError(415, "send the body as 'Content-Type: application/json'", code="unsupported_media_type")
            await err.response()(scope, receive, send)
            return
        declared = headers.get("content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_body
            except ValueError:
                await APIError(400, "malformed Content-Length header").response()(scope, receive, send)
                return
            if too_big:
                await self._too_large(scope, receive, send)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away while sending
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                await self._too_large(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _host_allowed(self, name: str) -> bool:
        """An allowed name, or an IP literal (a rebinding page can only send its own DNS name)."""
        if name in self.hosts:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        scheme, _, given = headers.get("authorization", b"").partition(b" ")
        assert self.key is not None
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = APIError(413, f"request body is larger than {self.max_body} bytes", code="body_too_large")
        await err.response()(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the buffered body once, then whatever the connection sends (disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _bare(host: str) -> str:
    return host.strip().lower().strip("[]").rstrip(".")


def _host_name(value: bytes) -> str:
    """The name in a Host header, port removed (``[::1]:8000`` -> ``::1``)."""
    host = value.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_json(headers: dict[str, bytes]) -> bool:
    media = headers.get("content-type", b"").split(b";", 1)[0].strip().lower()
    return media == b"application/json"
