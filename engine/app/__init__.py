"""The application layer: what users run and embed.

    engine.py   RunConfig, Weights, load_networks, Engine (the fast path, or the reference path)
    session.py  LipSync: frames + speech in, lip-synced frames out (worker threads, device streams)
    avatar.py   prepared avatars (``.lfa``): prepare, save, load (``lipforcing prepare-avatar``)
    run.py      run_video: a file (or an avatar) in, an MP4 out (``lipforcing run``)
    demo.py     the demo input built locally (``lipforcing demo``)
    cli.py      the command registry and the engine's commands
    server/     ``lipforcing serve`` and ``lipforcing client``: WebSocket, WebRTC, a web page, Ray Serve

Imports: everything below it (dit, runtime, codecs, media, tools) and ``lipforcing.compile``.
``lipforcing.bench`` builds on this package, never the reverse.
"""
