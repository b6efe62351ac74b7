"""Sessions: one per backend, one interface (:class:`qeff.runtime.base.Session`)."""

from __future__ import annotations

from qeff.runtime.base import Session

__all__ = ["Session"]


def open_session(
    artifact_dir,
    *,
    threads: int | None = None,
    binding: str = "inplace",
    device_ids: list[int] | None = None,
    specialize_decode: bool = False,
) -> Session:
    """Open a compiled artifact directory; dimensions come from its manifest (ORT) or the QPC
    itself (Cloud AI). ``device_ids`` is the Cloud AI device group; ``threads``/``binding`` are ORT's."""
    from pathlib import Path

    from qeff.artifacts import read_manifest
    from qeff.errors import ArtifactError

    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    if manifest is None and ((artifact_dir / "programqpc.bin").is_file() or (artifact_dir / "qpcs").is_dir()):
        manifest = {"inputs": {"backend": "qaic"}}  # a QPC compiled elsewhere (or by hand)
    if manifest is None:
        raise ArtifactError(f"{artifact_dir} is not a compiled qeff artifact (no manifest.json); run `qeff compile`")
    inputs = manifest.get("inputs", {})
    backend, options = inputs.get("backend"), inputs.get("options", {})
    if backend == "ort":
        from qeff.compilers.ort import OPTIMIZED
        from qeff.runtime.ort import OrtSession

        session = OrtSession(
            artifact_dir / OPTIMIZED,
            batch_size=options["batch_size"],
            ctx_len=options["ctx_len"],
            threads=threads,
            binding=binding,
            prompt_len=options["prompt_len"],
            specialize_decode=specialize_decode,
        )
        return session
    if backend == "qaic":
        from qeff.runtime.qaic import QaicSession

        return QaicSession(artifact_dir, device_ids=device_ids)
    raise ArtifactError(f"{artifact_dir} was compiled for backend {backend!r}, which this qeff cannot open")


__all__ += ["open_session"]
