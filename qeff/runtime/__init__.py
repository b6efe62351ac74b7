"""Sessions: one per backend, one interface (:class:`qeff.runtime.base.Session`)."""

from __future__ import annotations

from qeff.runtime.base import Session

__all__ = ["Session"]


#: Below this many bytes of weights, an ORT artifact opens with a pinned decode session by default.
SPECIALIZE_DECODE_MAX_BYTES = 2 * 2**30


def open_session(
    artifact_dir,
    *,
    threads: int | None = None,
    binding: str = "inplace",
    device_ids: list[int] | None = None,
    specialize_decode: bool | None = None,
    comp_ctx_lengths=None,
) -> Session:
    """Open a compiled artifact directory; dimensions come from its manifest (ORT) or the QPC
    itself (Cloud AI). ``device_ids`` is the Cloud AI device group; ``threads``/``binding`` are ORT's.

    ``specialize_decode`` (ORT): a second session with every dim pinned for decode steps, ~12%
    more decode tokens/s for a second copy of the weights in memory. None (default) turns it on
    when the weights are under ``SPECIALIZE_DECODE_MAX_BYTES``.

    ``comp_ctx_lengths`` (ORT portable graph with the ladder input): the ladder, as a list or a
    ``--comp_ctx_lengths`` string; None = the default ladder (:mod:`qeff.serving.ctx_ladder`)."""
    from pathlib import Path

    from qeff.artifacts import check_holder
    from qeff.errors import ArtifactError

    artifact_dir = Path(artifact_dir)
    # Sizes and digests of the artifact holding it (free right after a reuse or build); a QPC's
    # ``qpcs/`` directory is checked through its compile directory's manifest.
    checked = check_holder(artifact_dir)
    manifest = checked if (artifact_dir / "manifest.json").is_file() else None
    if manifest is None and ((artifact_dir / "programqpc.bin").is_file() or (artifact_dir / "qpcs").is_dir()):
        manifest = {"inputs": {"backend": "qaic"}}  # a QPC compiled elsewhere (or by hand)
    if manifest is None:
        raise ArtifactError(f"{artifact_dir} is not a compiled qeff artifact (no manifest.json); run `qeff compile`")
    inputs = manifest.get("inputs", {})
    backend, options = inputs.get("backend"), inputs.get("options", {})
    if backend == "ort" and ("full_batch_size" in options or "num_speculative_tokens" in options):
        from qeff.layout import ORT_OPTIMIZED as OPTIMIZED
        from qeff.serving.session import ServingOrtSession

        return ServingOrtSession(
            artifact_dir / OPTIMIZED,
            batch_size=options.get("full_batch_size") or options["batch_size"],
            full_batch_size=options.get("full_batch_size"),
            ctx_len=options["ctx_len"],
            threads=threads,
            prompt_len=options["prompt_len"],
            num_speculative_tokens=options.get("num_speculative_tokens"),
            comp_ctx_lengths=comp_ctx_lengths,
        )
    if backend == "ort" and inputs.get("graph") == "fused":
        from qeff.layout import ORT_FUSED
        from qeff.runtime.ort_fused import FusedOrtSession

        return FusedOrtSession(artifact_dir / ORT_FUSED, batch_size=options["batch_size"], ctx_len=options["ctx_len"],
                               prompt_len=options["prompt_len"], threads=threads)
    if backend == "ort":
        from qeff.layout import ORT_OPTIMIZED as OPTIMIZED
        from qeff.runtime.ort import OrtSession

        if specialize_decode is None:
            weights = sum(p.stat().st_size for p in artifact_dir.glob(OPTIMIZED + "*"))
            specialize_decode = weights < SPECIALIZE_DECODE_MAX_BYTES

        session = OrtSession(
            artifact_dir / OPTIMIZED,
            batch_size=options["batch_size"],
            ctx_len=options["ctx_len"],
            threads=threads,
            binding=binding,
            prompt_len=options["prompt_len"],
            specialize_decode=specialize_decode,
            comp_ctx_lengths=comp_ctx_lengths,
        )
        return session
    if backend == "qaic":
        from qeff.runtime.qaic import QaicSession

        return QaicSession(artifact_dir, device_ids=device_ids)
    raise ArtifactError(f"{artifact_dir} was compiled for backend {backend!r}, which this qeff cannot open")


__all__ += ["open_session"]
