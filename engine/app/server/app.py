"""The ``lipforcing serve`` application (FastAPI): live sessions over WebSocket and WebRTC, a web page, health.

    app = build_app(ServerOptions(run_config=RunConfig(model="1.3b"), token="secret", avatars="avatars/"))
    # uvicorn runs it (lipforcing serve), or Ray Serve runs one per GPU (lipforcing serve --ray)

Routes: ``GET /`` the web page; ``GET /healthz`` (503 until the engine is warm, then 200; only its status
without the token, the stats with it); ``GET /v1/avatars`` and ``GET /v1/stats``; ``WS /v1/session``
(protocol.py); ``POST /v1/webrtc/offer`` (webrtc.py). Everything but the page and the health check needs the
token (when the server has one, see auth.py): a wrong or missing token is answered 401 and no session is
made. No generated API pages (``/docs``, ``/redoc``, ``/openapi.json``): protocol.py is the reference.

Limits, each with a clear error: at most ``max_sessions`` sessions (``busy``); at most ``max_connections``
WebSocket connections and WebRTC peers together (HTTP 503); messages of at most ``max_message_bytes`` (uvicorn
closes a connection that sends a larger one, code 1009; behind Ray Serve the app answers ``too_large``); a
WebRTC offer of at most ``max_message_bytes`` (HTTP 413); uploads of at most ``max_upload_bytes`` each and
``max_uploads_bytes`` in progress together (``too_large``, ``busy``); ``idle_timeout`` seconds without a
message (``closing``), or, for a WebRTC peer, without connecting. The server states its limits to every client
in a ``hello`` message first (protocol.py). Speech and frames wait in bounded queues (live.py): a client that
sends speech faster than its session runs is read at the session's pace, and one that does not take its frames
for ``max_lag`` seconds is dropped (``closing``). A malformed message gets
an ``error`` reply and the connection carries on; the log gets one line, not a traceback. A refused upload's
error does not show the server's file paths. On shutdown (SIGTERM, Ctrl-C) every session is told ``closing``
before its connection closes, and the server's temporary files are removed, as they are after a start that
fails or is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse

from ...errors import ConfigError, EngineBusy, LipforcingError
from ..engine import Engine, RunConfig, Weights, build_engine
from ..session import DEFAULT_LOOKAHEAD_S
from . import protocol
from .auth import token_matches
from .live import LiveSession

log = logging.getLogger("lipforcing")
STATIC = Path(__file__).with_name("static")
CLOSING_S = 2.0
"""Seconds the ``closing`` message and the close handshake may take on a client that does not read."""


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """What ``lipforcing serve`` is started with (the CLI flags map onto these)."""

    run_config: RunConfig = field(default_factory=lambda: RunConfig(model="tiny"))
    weights: Weights = field(default_factory=Weights)
    token: str | None = None
    """Clients must send it (Authorization: Bearer, or ?token=); None: no authentication (loopback use)."""
    avatars: str | None = None
    """A folder of prepared avatars (*.lfa), offered by name."""
    max_message_bytes: int = 1 << 20
    """The largest message a client may send (the transport's limit too) and the largest WebRTC offer."""
    max_upload_bytes: int = 512 << 20
    max_uploads_bytes: int = 1 << 30
    """The uploads in progress together (the bytes each announced)."""
    max_connections: int = 64
    """WebSocket connections and WebRTC peers at once (sessions or not)."""
    idle_timeout: float = 30.0
    """Seconds without a message before a session ends; for a WebRTC peer, seconds to connect."""
    max_lag: float = 10.0
    """Seconds a client may leave its frames untaken before it is dropped."""
    lookahead: float = DEFAULT_LOOKAHEAD_S
    jpeg_quality: int = 85

    def __post_init__(self) -> None:
        if self.token is not None and not self.token.strip():
            raise ConfigError("the server's token is empty: give one, or None for no authentication")


class ServerState:
    """The engine, the avatars and the live connections of one server process."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.engine: Engine | None = None
        self.avatars: dict = {}
        self.connections: set[Connection] = set()
        self.ready = False
        self.failed: str | None = None
        # named now, made by start(): whoever holds the state can remove it whenever the process is stopped
        self.tmp = Path(tempfile.gettempdir()) / f"lipforcing-serve-{secrets.token_hex(6)}"
        self.peers: dict = {}  # WebRTC peer connection -> its closing-message function
        self.uploading = 0  # bytes announced by the uploads in progress

    def start(self) -> None:
        """Build and warm the engine, load the avatars (blocking: run it in a thread). Once only; a failure is
        kept in ``failed``."""
        from ..avatar import Avatar

        if self.ready or self.failed:
            return
        self.tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            folder = self.options.avatars  # read first: a broken file fails before the long warm-up
            avatars = {path.stem: Avatar.load(path) for path in sorted(Path(folder).glob("*.lfa"))} if folder else {}
            engine = build_engine(self.options.run_config, self.options.weights)
            engine.warm_up()
            from .webrtc import preload

            preload()
            for avatar in avatars.values():
                avatar.check_engine(engine)
            self.engine, self.avatars, self.ready = engine, avatars, True
            log.warning("lipforcing serve: ready (%s, %d avatar(s))", engine.path["model"], len(self.avatars))
        except LipforcingError as exc:
            self.failed = str(exc)

    async def close_connections(self, reason: str) -> None:
        """Tell every session it ends (``closing``) and close the connections (server shutdown)."""
        await asyncio.gather(*(c.shut(reason) for c in list(self.connections)), return_exceptions=True)
        for tell in list(self.peers.values()):
            tell(reason)
        await asyncio.sleep(0.05)  # let the data channels carry it
        await asyncio.gather(*(peer.close() for peer in list(self.peers)), return_exceptions=True)

    async def stop(self) -> None:
        await self.close_connections("the server is shutting down")
        if self.engine is not None:
            self.engine.close()
        self.remove_files()

    def remove_files(self) -> None:
        """Remove the server's temporary folder, uploads in progress included (idempotent)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def authorized(self, headers, query) -> bool:
        return token_matches(self.options.token, headers, query)

    def full(self) -> bool:
        """Whether ``max_connections`` connections and peers are open."""
        return len(self.connections) + len(self.peers) >= self.options.max_connections

    def stats(self) -> dict:
        engine = self.engine
        return {
            "ready": self.ready,
            "sessions": sum(1 for c in self.connections if c.live is not None) + len(self.peers),
            "slots_in_use": sum(p.in_use for p in engine.parts) if engine else 0,
            "slots": len(engine.parts) if engine else 0,  # session parts built (reused by later sessions)
            "max_sessions": self.options.run_config.max_sessions,
            "avatars": sorted(self.avatars),
            "replica": os.getpid(),
            "engine": engine.path if engine else None,
        }


class Connection:
    """One WebSocket client: its messages, its upload, its live session."""

    def __init__(self, ws, state: ServerState) -> None:
        self.ws, self.state = ws, state
        self.live: LiveSession | None = None
        self.upload: dict | None = None
        self.closed = False
        self.ended = False  # the client said "end"
        self.dropped: str | None = None  # why the server dropped a client that does not read
        self.reader: asyncio.Task | None = None  # the task that runs ``run``
        self.id = uuid.uuid4().hex[:12]

    async def send_text(self, text: str, timeout: float | None = None) -> None:
        if not self.closed:
            try:
                await asyncio.wait_for(self.ws.send_text(text), timeout or self.state.options.max_lag)
            except Exception:  # the client went away or does not read: the receive loop notices
                self.closed = True

    async def shut(self, reason: str) -> None:
        """Tell the client the session ends, stop it and close the connection (a client that does not read gets
        ``CLOSING_S`` seconds for each of the two: a shutdown waits for nobody)."""
        self._stop_live()
        await self.send_text(protocol.closing(reason), timeout=CLOSING_S)
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):  # already gone, or not reading
                await asyncio.wait_for(self.ws.close(code=1001), CLOSING_S)

    def _stop_live(self) -> None:
        if self.live is not None:
            self.live.close()

    async def run(self) -> None:
        """The receive loop, until the client leaves, the session ends or the client is dropped."""
        self.reader = asyncio.current_task()
        try:
            await self._receive_loop()
        except asyncio.CancelledError:
            if self.dropped is None:  # cancelled by the server's shutdown, not by ``_drop``
                raise

    async def _receive_loop(self) -> None:
        opts = self.state.options
        sender = None
        await self.send_text(protocol.hello(max_message_bytes=opts.max_message_bytes,
                                            max_upload_bytes=opts.max_upload_bytes, max_lag_s=opts.max_lag))
        try:
            while not self.closed:
                # idle: no message while the session waits for speech (not while it finishes after "end")
                timeout = None if self.ended else opts.idle_timeout
                try:
                    message = await asyncio.wait_for(self.ws.receive(), timeout=timeout)
                except asyncio.TimeoutError:
                    await self.shut(f"idle for {opts.idle_timeout:g} s")
                    return
                if message["type"] == "websocket.disconnect":
                    return
                data, text = message.get("bytes"), message.get("text")
                size = len(data) if data is not None else len((text or "").encode())
                if size > opts.max_message_bytes:
                    await self.send_text(protocol.error("too_large", f"a message of {size} bytes; at most "
                                                                    f"{opts.max_message_bytes} are accepted"))
                    continue
                try:
                    if text is not None:
                        started = await self._control(protocol.decode_text(text))
                    else:
                        started = await self._binary(protocol.decode_binary(data))
                except protocol.ProtocolError as exc:
                    log.info("lipforcing serve: connection %s: malformed message: %s", self.id, exc)
                    await self.send_text(protocol.error("malformed", str(exc)))
                    continue
                except Exception as exc:  # a message the checks above let through: one line, not a traceback
                    log.warning("lipforcing serve: connection %s: a message failed: %r", self.id, exc,
                                exc_info=log.isEnabledFor(logging.INFO))  # the traceback with -v
                    await self._refuse("internal", "the server could not handle that message")
                    continue
                if started:
                    sender = asyncio.create_task(self._send_outputs())
        finally:
            self._stop_live()
            if sender is not None:
                try:
                    await asyncio.wait_for(sender, timeout=30)
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    sender.cancel()
            self._drop_upload()

    async def _control(self, message: dict) -> bool:
        kind = message["type"]
        if kind == "start":
            if self.live is not None or self.upload is not None:
                raise protocol.ProtocolError("the session has already started")
            return await self._start(message)
        if kind == "end":
            if self.live is None:
                raise protocol.ProtocolError('"end" before the session started')
            self.live.end()
            self.ended = True
            return False
        if kind == "close":
            await self.shut("closed by the client")
            return False
        raise protocol.ProtocolError(f"unknown message type {kind[:40]!r}")

    async def _binary(self, message: protocol.Decoded) -> bool:
        if message.kind == protocol.AUDIO_IN:
            if self.live is None:
                raise protocol.ProtocolError("AUDIO before the session started")
            self.live.push_audio(message.payload)
            await self.live.wait_room()  # backpressure: the socket is not read while the session catches up
            return False
        if message.kind == protocol.UPLOAD:
            if self.upload is None:
                raise protocol.ProtocolError("UPLOAD without a start message announcing it")
            up = self.upload
            up["file"].write(message.payload)
            up["received"] += len(message.payload)
            if up["received"] > up["bytes"]:
                await self._refuse("bad_upload", f"the upload is longer than the {up['bytes']} bytes announced")
                return False
            if up["received"] == up["bytes"]:
                return await self._finish_upload()
            return False
        raise protocol.ProtocolError(f"message type 0x{message.kind:02x} is sent by the server, not by clients")

    async def _start(self, message: dict) -> bool:
        opts, state = self.state.options, self.state
        lookahead = protocol.lookahead_of(message, opts.lookahead)
        rate = message.get("sample_rate", 16000)
        if not isinstance(rate, int) or not 8000 <= rate <= 192000:
            raise protocol.ProtocolError("sample_rate must be an integer number of Hz")
        self.params = dict(lookahead=lookahead, sample_rate=rate)
        if "upload" in message:
            kind, size = message.get("upload"), message.get("bytes")
            if kind not in ("avatar", "video") or isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise protocol.ProtocolError('"upload" is "avatar" or "video", with "bytes": a positive size')
            if size > opts.max_upload_bytes:
                await self._refuse("too_large", f"an upload of {size} bytes; at most {opts.max_upload_bytes}")
                return False
            if state.uploading + size > opts.max_uploads_bytes:
                await self._refuse("busy", f"the server receives {state.uploading} bytes of uploads already; try "
                                           f"again later")
                return False
            path = state.tmp / f"{self.id}{'.lfa' if kind == 'avatar' else '.video'}"
            self.upload = dict(kind=kind, bytes=size, received=0, path=path, file=open(path, "wb"))  # noqa: SIM115
            state.uploading += size
            return False
        name = message.get("avatar")
        if not isinstance(name, str):
            raise protocol.ProtocolError('"start" names an "avatar" (a string) or announces an "upload"')
        if name not in state.avatars:
            await self._refuse("bad_avatar", f"no avatar {name!r} here; the server has {sorted(state.avatars)}")
            return False
        return await self._open(state.avatars[name])

    async def _finish_upload(self) -> bool:
        from ..avatar import Avatar, prepare_avatar

        up, self.upload = self.upload, None
        up["file"].close()
        self.state.uploading -= up["bytes"]
        try:
            if up["kind"] == "avatar":
                avatar = await asyncio.to_thread(Avatar.load, up["path"])
                avatar.check_engine(self.state.engine)
            else:
                avatar = await asyncio.to_thread(prepare_avatar, up["path"], self.state.engine, progress=False)
        except LipforcingError as exc:
            await self._refuse("bad_upload", self._without_paths(str(exc), up))
            return False
        except Exception as exc:  # a file crafted past the readers' checks
            log.warning("lipforcing serve: connection %s: the uploaded %s failed: %r", self.id, up["kind"], exc)
            await self._refuse("bad_upload", f"the uploaded {up['kind']} cannot be read")
            return False
        finally:
            up["path"].unlink(missing_ok=True)
        return await self._open(avatar)

    def _without_paths(self, message: str, upload: dict) -> str:
        """An error about an upload, the server's file names replaced by what the client knows them as."""
        upload_name, path, tmp = f"the uploaded {upload['kind']}", upload["path"], self.state.tmp
        for where, name in ((path.resolve(), upload_name), (path, upload_name), (tmp.resolve(), "the server"),
                            (tmp, "the server"), (path.name, upload_name)):  # whole paths before their parts
            message = message.replace(str(where), name)
        return message

    async def _open(self, avatar) -> bool:
        loop = asyncio.get_running_loop()
        opts = self.state.options
        try:
            self.live = await asyncio.to_thread(LiveSession, self.state.engine, avatar, loop=loop,
                                                jpeg_quality=opts.jpeg_quality, **self.params)
        except EngineBusy as exc:
            await self._refuse("busy", str(exc))
            return False
        except LipforcingError as exc:
            await self._refuse("bad_avatar", str(exc))
            return False
        await self.send_text(protocol.ready(self.id, self.live.width, self.live.height))
        return True

    async def _refuse(self, code: str, message: str) -> None:
        await self.send_text(protocol.error(code, message))
        if code in protocol.FATAL:
            await self.shut(message)

    async def _send_outputs(self) -> None:
        async for item in self.live.outputs():
            if self.closed:
                continue
            try:
                if item[0] == "frames":
                    _, frames, (first, speech) = item
                    await self._send_bytes(protocol.encode_audio_out(first, speech))
                    for index, jpeg in frames:
                        await self._send_bytes(protocol.encode_frame(index, jpeg))
                elif item[0] == "done":
                    await asyncio.wait_for(self.ws.send_text(json.dumps({"type": "done", "frames": item[1]})),
                                           self.state.options.max_lag)
                    self.closed = True
                    await asyncio.wait_for(self.ws.close(code=1000), self.state.options.max_lag)
                elif item[0] == "error":
                    message = str(item[1]) if isinstance(item[1], LipforcingError) else repr(item[1])
                    await self.send_text(protocol.error("internal", f"the session failed: {message}"))
                    await self.shut("the session failed")
            except asyncio.TimeoutError:
                self._drop(f"the client took no frame for {self.state.options.max_lag:g} s")
            except Exception:  # the client went away (the receive loop may be waiting for the session: stop it)
                self.closed = True
                self._stop_live()

    async def _send_bytes(self, data: bytes) -> None:
        """Send, or raise TimeoutError when the client's socket takes nothing for ``max_lag`` seconds."""
        await asyncio.wait_for(self.ws.send_bytes(data), self.state.options.max_lag)

    def _drop(self, reason: str) -> None:
        """Stop the session of a client that does not read, and end its receive loop (its socket cannot take a
        ``closing`` message; the transport closes it)."""
        log.warning("lipforcing serve: connection %s dropped: %s", self.id, reason)
        self.dropped, self.closed = reason, True
        self._stop_live()
        if self.reader is not None:
            self.reader.cancel()

    def _drop_upload(self) -> None:
        if self.upload is not None:
            self.state.uploading -= self.upload["bytes"]
            self.upload["file"].close()
            self.upload["path"].unlink(missing_ok=True)
            self.upload = None


def build_app(options: ServerOptions):
    """The FastAPI application of one server process (uvicorn's, or one Ray Serve replica's)."""
    state = ServerState(options)

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(state.start)
        if state.failed:  # (Ray Serve: the replica fails to start and says why)
            log.error("lipforcing serve: cannot start: %s", state.failed)
            state.remove_files()
            raise RuntimeError(f"lipforcing serve cannot start: {state.failed}")
        yield
        await state.stop()

    app = FastAPI(title="lipforcing", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lipforcing = state

    def refused():
        return JSONResponse({"error": "unauthorized: send the server's token"}, status_code=401)

    def full():
        return JSONResponse({"error": f"the server has {options.max_connections} connections open; try again later"},
                            status_code=503)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz")
    async def health(request: Request):
        # a load balancer's probe needs the status only; the avatars, the engine and the PID need the token
        details = state.authorized(request.headers, request.query_params)
        if state.failed:
            return JSONResponse({"status": "failed", **({"error": state.failed} if details else {})}, status_code=500)
        if not state.ready:
            return JSONResponse({"status": "warming up"}, status_code=503)
        return {"status": "ok", **(state.stats() if details else {})}

    @app.get("/v1/avatars")
    async def avatars(request: Request):
        if not state.authorized(request.headers, request.query_params):
            return refused()
        return {"avatars": sorted(state.avatars)}

    @app.get("/v1/stats")
    async def stats(request: Request):
        if not state.authorized(request.headers, request.query_params):
            return refused()
        return state.stats()

    @app.websocket("/v1/session")
    async def session(ws: WebSocket):
        if not state.authorized(ws.headers, ws.query_params):
            try:
                await ws.send_denial_response(refused())
            except Exception:  # the transport cannot send an HTTP status: close before accepting
                await ws.close(code=4401)
            return
        if not state.ready:
            await ws.close(code=1013)  # try again later
            return
        if state.full():
            await ws.send_denial_response(full())
            return
        await ws.accept()
        connection = Connection(ws, state)
        state.connections.add(connection)
        try:
            await connection.run()
        finally:
            state.connections.discard(connection)

    @app.post("/v1/webrtc/offer")
    async def offer(request: Request):
        if not state.authorized(request.headers, request.query_params):
            return refused()
        from .webrtc import answer_offer

        if state.full():
            return full()
        raw = await _read_body(request, options.max_message_bytes)
        if raw is None:
            return JSONResponse({"error": f"an offer of at most {options.max_message_bytes} bytes"}, status_code=413)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # (nested too deep for the parser)
            return JSONResponse({"error": "the offer must be JSON: {sdp, type, avatar}"}, status_code=400)
        try:
            return await answer_offer(state, body)
        except Exception as exc:  # an offer the checks let through: one line, not a traceback
            log.warning("lipforcing serve: a WebRTC offer failed: %r", exc, exc_info=log.isEnabledFor(logging.INFO))
            return JSONResponse({"error": "the server could not answer the offer"}, status_code=500)

    return app


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request's body, or None when it is longer than ``limit`` bytes (read no further than that)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    pieces, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            return None
        pieces.append(piece)
    return b"".join(pieces)
