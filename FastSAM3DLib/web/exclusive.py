"""One browser session per server process.

trame keeps one state and one MRML scene per process and sends every change to
every connected browser, so a second tab or user would see the first one's
scans, segments and uploads. The server therefore admits one browser session
(one websocket) at a time: a later one is refused at the wslink handshake, so
not one state message or view image reaches it, and its page says why. When
the admitted session disconnects, its scene is cleared before the next one can
be admitted.
"""

from __future__ import annotations

import html
import logging
from typing import Callable

from aiohttp import web
from wslink.websocket import LinkProtocol

log = logging.getLogger(__name__)

IN_USE = ("This FastSAM3D server is in use by another browser session. Start another server for this one, "
          "e.g. fastsam3d web --port 8081 (each server keeps its own scans), or close the other tab first.")
IN_USE_PAGE = (f"<!doctype html><html><head><meta charset='utf-8'><title>FastSAM3D: server in use</title></head>"
               f"<body style='font-family: sans-serif; margin: 3em'><h2>FastSAM3D</h2>"
               f"<p id='fs3d-in-use'>{html.escape(IN_USE)}</p></body></html>")
PAGES = ("/", "/index.html")


class ExclusiveSession:
    """The one admitted browser connection. ``on_end`` clears the scene when it
    leaves; if that fails, nobody else is admitted (fail closed)."""

    def __init__(self, on_end: Callable[[], None]):
        self.owner: str | None = None
        self._on_end = on_end

    @property
    def in_use(self) -> bool:
        return self.owner is not None

    def admit(self, client_id) -> bool:
        if self.owner is None:
            self.owner = client_id
            log.info("browser session %s admitted", client_id)
            return True
        if client_id != self.owner:
            log.info("browser session %s refused: the server is in use by another session", client_id)
        return client_id == self.owner

    def end(self, client_id) -> None:
        if client_id is None or client_id != self.owner:
            return
        self._on_end()                  # raises: the owner stays set, the server refuses everyone
        self.owner = None
        log.info("browser session %s ended; its scene was cleared", client_id)


class ExclusiveSessionProtocol(LinkProtocol):
    """wslink's hook: the handshake's token check and the connection's close."""

    def __init__(self, guard: ExclusiveSession, root_protocol):
        super().__init__()
        self.guard = guard
        self.root_protocol = root_protocol

    async def validateToken(self, token, client_id):
        # Once a protocol checks tokens wslink no longer compares the secret itself.
        return token == self.root_protocol.secret and self.guard.admit(client_id)

    def onClose(self, client_id):
        self.guard.end(client_id)


def page_refusal(guard: ExclusiveSession):
    """aiohttp middleware: while a session is admitted the page itself is
    answered with 409 and the reason, so a second tab shows a clear message."""
    @web.middleware
    async def middleware(request, handler):
        if guard.in_use and request.path in PAGES:
            return web.Response(status=409, text=IN_USE_PAGE, content_type="text/html")
        return await handler(request)
    return middleware


def install(server, guard: ExclusiveSession) -> None:
    """Put ``guard`` on a trame server (before it starts)."""
    server.add_protocol_to_configure(
        lambda protocol: protocol.registerLinkProtocol(ExclusiveSessionProtocol(guard, protocol)))
    server.controller.on_server_bind.add(lambda wslink_server: wslink_server.app.middlewares.append(
        page_refusal(guard)))
