"""Run the server: one process with uvicorn (``lipforcing serve``), or replicas on Ray Serve (``--ray``).

    run_server(ServerOptions(...), host="127.0.0.1", port=8080)          # until SIGTERM / Ctrl-C
    run_ray(ServerOptions(...), replicas=2, host="127.0.0.1", port=8080)  # one replica per GPU

Shutdown (SIGTERM, Ctrl-C): every session is told ``closing`` first, then the connections close, the engine
stops and the server's temporary files are removed; the process exits with status 0. A server stopped while it
warms up (status 143 or 130), or one that cannot start (status 2), removes its temporary files too.
"""

from __future__ import annotations

import logging

from ...errors import LipforcingError
from ..engine import RunConfig
from .app import ServerOptions, build_app

log = logging.getLogger("lipforcing")
GIB = 1 << 30


MAX_DEFAULT_SESSIONS = 8
"""The most sessions per engine a sized default gives (past it, ask with --max-sessions)."""


def default_sessions(config: RunConfig, free_bytes: int | None = None) -> tuple[int, str]:
    """Sessions per engine when ``--max-sessions`` is not given, and why: 1 on a CPU (the sessions would share
    its cores) or without the static scheduler; on a GPU as many as the memory plan of sessions on prepared
    avatars (``lipforcing info --memory --avatar``, at the model's face crops and 1080p frames) fits in
    90% of the device's free memory, at most ``MAX_DEFAULT_SESSIONS``. ``free_bytes``: the device's free memory
    (default: asked from CUDA). With ``gpus`` above 1 the one-GPU plan sizes rank 0 too: it errs on the safe side
    (rank 0 holds 1/N of each session's KV cache)."""
    if not config.device.startswith("cuda"):
        return 1, "on a CPU"
    if config.scheduler != "static":
        return 1, "with the reference scheduler"
    from ...dit.config import ModelConfig
    from ...numerics import parse_precision
    from ...tools.memory import memory_plan

    if free_bytes is None:
        import torch

        from ..engine import require_device

        free_bytes, _ = torch.cuda.mem_get_info(require_device(config))
    dtype, fp8 = parse_precision(config.dtype)
    model = ModelConfig.from_name(config.model)
    plan = memory_plan(model, model.face_stream(), dtype=dtype, fp8=fp8, encoder=config.encoder,
                       decoder=config.decoder, avatar=True)
    budget = int(free_bytes * 0.9)
    fits = 1 + max(0, budget - plan["total_bytes"]) // max(1, plan["per_session_bytes"])
    sessions = int(min(MAX_DEFAULT_SESSIONS, fits))
    return sessions, (f"the memory plan: {plan['total_bytes'] / GIB:.1f} GiB for one session, "
                      f"{plan['per_session_bytes'] / GIB:.2f} GiB each more, {free_bytes / GIB:.1f} GiB free")


def run_server(options: ServerOptions, *, host: str = "127.0.0.1", port: int = 8080) -> None:
    app = build_app(options)
    state = app.state.lipforcing
    try:  # the temporary folder goes whichever way the process ends: a failed start, a signal in the warm-up
        _serve_until_stopped(app, state, host, port)
    finally:
        state.remove_files()


def _serve_until_stopped(app, state, host: str, port: int) -> None:
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            await state.close_connections("the server is shutting down")  # before uvicorn drops them
            await super().shutdown(sockets)

    # the transport's message limit is the app's: a larger message is refused before it is read whole
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                            ws_max_size=state.options.max_message_bytes, timeout_graceful_shutdown=10)
    log.warning("lipforcing serve: http://%s:%d (warming up)", host, port)
    state.start()  # before listening: a server that cannot start says why and exits (status 2)
    if state.failed:
        raise LipforcingError(f"the server cannot start: {state.failed}")
    # uvicorn re-raises the signal that stopped it once it has shut down, which would end the process with
    # status 143 (SIGTERM) or a KeyboardInterrupt after a clean shutdown: the handlers in place meanwhile
    # take that re-raised signal and ignore it.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_for_replicas(host: str, port: int, replicas: int, token: str | None, timeout: float = 900.0) -> None:
    """Until every replica has warmed up: ``/healthz`` answers 200 from ``replicas`` distinct processes (Ray's
    router spreads the requests; the token makes it name its process). A replica that cannot start ends the
    wait with its reason."""
    import json
    import time
    import urllib.error
    import urllib.request

    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/healthz"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ready: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(ready) < replicas:
        if time.monotonic() > deadline:
            raise LipforcingError(f"only {len(ready)} of {replicas} replicas were ready after {timeout:.0f} s")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
                ready.add(json.load(response)["replica"])
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            if exc.code == 500 and body.get("error"):
                raise LipforcingError(f"a replica cannot start: {body['error']}") from None
            time.sleep(0.2)
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)


def run_ray(options: ServerOptions, *, replicas: int, host: str = "127.0.0.1", port: int = 8080) -> None:
    """The same application on Ray Serve: ``replicas`` replicas, one GPU each on CUDA (CPU replicas
    otherwise). A WebSocket session lives on the replica that accepted its connection; a WebRTC session on
    the one that answered its offer."""
    import signal
    import threading

    import ray
    from ray import serve

    cuda = options.run_config.device.startswith("cuda")
    verbose = log.isEnabledFor(logging.INFO)
    if not verbose:  # Ray's own lines (token-auth notice, Serve's INFO) only with -v
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(logging.ERROR)
    # Serve's HTTP proxy listens on --host. Ray's own servers (GCS, raylet, workers, agents) listen on every
    # interface whatever the node address (Ray 2.60; it asks them for a token): a firewall must keep them in
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port},
                logging_config=None if verbose else serve.schema.LoggingConfig(log_level="WARNING"))

    def builder():
        return build_app(options)

    deployment = serve.deployment(
        name="lipforcing", num_replicas=replicas, max_ongoing_requests=1000,
        ray_actor_options={"num_gpus": 1 if cuda else 0, "num_cpus": 0},
        health_check_period_s=5, graceful_shutdown_timeout_s=10,
    )(serve.ingress(builder)())  # the builder runs on each replica: its own engine, warmed before it serves
    serve.run(deployment.bind(), name="lipforcing", route_prefix="/")
    _wait_for_replicas(host, port, replicas, options.token)
    log.warning("lipforcing serve: %d Ray Serve replica(s) ready at http://%s:%d", replicas, host, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
