"""``lipforcing serve``: live sessions on prepared avatars for remote clients.

    protocol.py  the WebSocket messages (version 1), shared by server, client and page
    live.py      one client's live session: a LipSync on an avatar, run by a worker thread
    auth.py      who may use it: the token (flag, file, environment), loopback without one
    app.py       the FastAPI application: routes, limits, authentication, shutdown
    webrtc.py    the WebRTC transport (aiortc)
    serve.py     uvicorn (one process) or Ray Serve (one replica per GPU)
    client.py    the reference client (``lipforcing client``)
    static/      the web page served at /
"""
