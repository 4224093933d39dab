"""FastSAM3D in the browser: a trame-slicer app over the engine and the MRML bridge.

Needs the ``web`` extra (``pip install -e .[web]``); the core library never
imports this package. Start it with ``fastsam3d web [IMAGE ...]``.
"""
