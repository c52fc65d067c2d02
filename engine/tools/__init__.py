"""Tools that check and plan the engine without running a session.

    golden.py   parity with the original network's golden files (``lipforcing check-reference``)
    info.py     parameters, FLOPs (student and codecs) and compute floors (``lipforcing info``)
    memory.py   the device-memory plan, measured on the meta device (``lipforcing info --memory``)
    tiny.py     random-weight networks of the ``tiny`` model (demos, tests, training's tiny preset)

Imports: the DiT core, the runtime, the codecs and the media layer. The application layer and training call them.
"""
