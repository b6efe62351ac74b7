"""Compilers: turn an exported retained-state ONNX graph into a runnable artifact for a backend.

Each backend's module writes into a directory it is given and returns a manifest of what produced
it; the artifact cache decides where that directory lives and when to reuse it.
"""
