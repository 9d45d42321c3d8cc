"""The chat page: a browser client of the JavaScript SDK, served by every node, no build step.

    GET  /             the page (clients/web/index.html)
    GET  /app/{file}   its modules and styles (clients/web/)
    GET  /sdk/{file}   the SDK's modules, straight from clients/js/src (the page's import map names
                       them `@chorus/client`, as an app built with npm would import them)
    POST /dev/login    `{"user"}` -> `{"token", "user", "expires_at"}`; 404 unless DEV_LOGIN is on

The page reads its token from the URL fragment (`/#token=<jwt>`), which browsers never send to a
server, so it is in no log; the page removes it from the address bar. Only the files present at
start are served, by name, so no path from a request ever reaches the filesystem. The page and its
modules revalidate on every load (`no-cache`): without a build step their names carry no version.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import jwt
import orjson
from aiohttp import web

from ws_node.auth import HMAC_ALGORITHMS
from ws_node.settings import NodeSettings

log = logging.getLogger(__name__)

CLIENTS = Path(__file__).resolve().parent.parent / "clients"  # in a checkout; WEB_ROOT elsewhere
DEV_TOKEN_TTL_S = 24 * 3600
MAX_USER_CHARS = 64
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
_IMPORT_MAP = re.compile(rb'<script type="importmap">(.*?)</script>', re.DOTALL)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application, settings: NodeSettings) -> None:
    """The page, its assets and the dev login. Without the page's files (`WEB_ROOT`, or clients/
    beside the packages in a checkout) the page is not served, and the node says so once."""
    app.router.add_post("/dev/login", _dev_login(settings))
    root = Path(settings.web_root) if settings.web_root else CLIENTS
    page_dir, sdk_dir = root / "web", root / "js" / "src"
    if not (page_dir / "index.html").is_file() or not sdk_dir.is_dir():
        log.warning("chat page not served: %s or %s is missing (WEB_ROOT)", page_dir, sdk_dir)
        return
    app.router.add_get("/", _page(page_dir / "index.html"))
    app.router.add_get("/app/{name}", _files(page_dir))
    app.router.add_get("/sdk/{name}", _files(sdk_dir))


def _headers(script_hash: str = "") -> dict[str, str]:
    """The page renders what an agent wrote (as text, never as HTML); the policy is the second
    line of defence: scripts only from this origin (and the page's own import map, by its hash),
    sockets and fetches only to it, and no framing."""
    policy = (f"default-src 'none'; script-src 'self'{script_hash}; style-src 'self'; img-src 'self' data:; "
              "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _page(path: Path) -> Handler:
    """index.html, read once: its policy names the hash of its inline import map."""
    body = path.read_bytes()
    script_hash = "".join(f" 'sha256-{base64.b64encode(hashlib.sha256(m).digest()).decode()}'"
                          for m in _IMPORT_MAP.findall(body))
    headers = _headers(script_hash)

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/html", charset="utf-8", headers=headers)

    return page


def _files(directory: Path) -> Handler:
    served = {p.name: p for p in directory.iterdir() if p.is_file() and p.suffix in CONTENT_TYPES}
    headers = _headers()

    async def file(request: web.Request) -> web.StreamResponse:
        path = served.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        response = web.FileResponse(path, headers=headers)
        response.content_type = CONTENT_TYPES[path.suffix]  # module scripts need a JavaScript type
        response.charset = "utf-8"
        return response

    return file


def _dev_login(settings: NodeSettings) -> Handler:
    algorithm = next((a for a in settings.jwt_algorithms if a in HMAC_ALGORITHMS), None)
    secret = settings.jwt_secret
    if settings.dev_login and (secret is None or algorithm is None):
        log.warning("DEV_LOGIN is on but the node has no HMAC secret to sign with: the dev login stays off")

    async def dev_login(request: web.Request) -> web.Response:
        # Off, it looks like any unknown path: a production node says nothing about it.
        if not settings.dev_login or secret is None or algorithm is None:
            raise web.HTTPNotFound()
        try:
            user = orjson.loads(await request.read()).get("user")
        except (orjson.JSONDecodeError, AttributeError):
            user = None
        if not isinstance(user, str) or not 0 < len(user) <= MAX_USER_CHARS or not user.isprintable() \
                or user != user.strip():
            raise web.HTTPBadRequest(text=f"user must be 1-{MAX_USER_CHARS} printable characters")
        expires_at = int(time.time()) + DEV_TOKEN_TTL_S
        claims: dict[str, object] = {"sub": user, "exp": expires_at}
        if settings.jwt_audience:
            claims["aud"] = settings.jwt_audience
        if settings.jwt_issuer:
            claims["iss"] = settings.jwt_issuer
        token = jwt.encode(claims, secret, algorithm)
        log.info("dev login", extra={"user": user})
        return web.json_response({"token": token, "user": user, "expires_at": expires_at},
                                 headers={"Cache-Control": "no-store"})

    return dev_login
