"""The cached chain behind ``qeff infer``: resolve → (load → transform → export) → verify → compile.

Each stage is an artifact directory under ``$QEFF_HOME`` (see :mod:`qeff.artifacts`)::

    <home>/<model slug>/export-<hash>/        model.onnx, model.onnx.data, tokenizer files, manifest.json
        verify-<hash>/                        manifest.json holding the verification report
        ort_1BS_32PL_128CL/                   model.opt.onnx, manifest.json
        qpc_16cores_1BS_32PL_128CL_1devices/  (Cloud AI 100)

The export hash covers what determines the graph: the model's identity (a digest of its weight
files, or the config + seed of a random model), the transforms, the exporter and library versions.
When an export is reused the model itself is not even loaded (its tokenizer is saved beside the
graph); it is loaded only if a stage that needs it (verification) has no matching artifact.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from qeff.artifacts import Built, build_artifact, manifest_hash, qeff_home
from qeff.errors import UsageError
from qeff.loading import ModelSource, load_source, resolve

__all__ = ["Prepared", "prepare", "stage", "verify_cached", "SMALL_MODEL_PARAMS"]

#: Verification runs by default for models up to this many parameters (it runs HF on the CPU).
SMALL_MODEL_PARAMS = 2_000_000_000


@contextmanager
def stage(description: str, *, enabled: bool = True):
    """Progress for work with no finer-grained progress: a running clock on a terminal; in logs
    (stderr not a TTY) one line when it starts and one when it ends."""
    if not enabled:
        yield
        return
    start = time.perf_counter()
    if not sys.stderr.isatty():
        print(f"{description} …", file=sys.stderr, flush=True)
        yield
        print(f"{description}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=description, bar_format="{desc}: {elapsed}", file=sys.stderr, leave=True)
    done = threading.Event()

    def tick():
        while not done.wait(0.5):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name.strip().strip("/")).strip("-") or "model"


@dataclass
class Prepared:
    """An exported model: where its graph is, and (loaded lazily) the model and tokenizer."""

    name: str
    export: Built
    source: ModelSource | None = None
    _model: object = None
    _qmodel: object = None
    _tokenizer: object = None
    load_s: float = 0.0
    timings: dict = field(default_factory=dict)

    @property
    def export_dir(self) -> Path:
        return self.export.path

    @property
    def onnx_path(self) -> Path:
        return self.export.path / "model.onnx"

    @property
    def num_parameters(self) -> int:
        return int(self.export.manifest.get("outputs", {}).get("num_parameters", 0))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.export is not None and (self.export_dir / "tokenizer_config.json").is_file():
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(str(self.export_dir))
            elif self.source is not None:
                from qeff.loading import load_tokenizer

                self._tokenizer = load_tokenizer(self.source)  # seconds, not the model's load
        return self._tokenizer

    @property
    def model(self):
        if self._model is None:
            self._load()
        return self._model

    @property
    def qmodel(self):
        if self._qmodel is None:
            from qeff.transforms import transform

            self._qmodel = transform(self.model)
        return self._qmodel

    def _load(self) -> None:
        if self.source is None:
            raise UsageError(f"{self.name}: the model object was not kept and has no source to reload it from")
        start = time.perf_counter()
        self._model, tokenizer = load_source(self.source)
        self._tokenizer = self._tokenizer or tokenizer
        self.load_s += time.perf_counter() - start


def _export_manifest(identity: dict) -> dict:
    from qeff.exporter import OPSET, library_versions
    from qeff.transforms.model import TRANSFORMS

    return {"stage": "export", "model": identity, "transforms": list(TRANSFORMS), "opset": OPSET, "versions": library_versions()}


def prepare(
    name: str | None = None,
    *,
    model=None,
    tokenizer=None,
    identity: dict | None = None,
    home: str | Path | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    force: bool = False,
    validate=None,
) -> Prepared:
    """Export ``name`` (or a given ``model`` with its ``identity``), reusing a matching export.

    ``validate(tokenizer)`` runs before any slow work (it may raise, e.g. for a prompt that cannot
    fit): before loading the model when the export must be built, right after a reuse otherwise."""
    home = Path(home) if home else qeff_home()
    source = None
    if model is None:
        if name is None:
            raise UsageError("prepare() needs a model name or a model object")
        source = resolve(name, revision=revision, cache_dir=cache_dir)
        identity = source.identity()
        display = name
    else:
        if identity is None:
            raise UsageError("prepare(model=...) needs identity=: what identifies these weights (e.g. config + seed)")
        display = name or identity.get("name", "model")
    manifest = _export_manifest(identity)
    target = home / slug(display) / f"export-{manifest_hash(manifest)}"
    prepared = Prepared(name=display, export=None, source=source, _model=model, _tokenizer=tokenizer)  # type: ignore[arg-type]

    def build(tmp: Path) -> dict:
        from qeff.exporter import export

        if validate is not None and prepared.tokenizer is not None:
            validate(prepared.tokenizer)
        loaded_model = prepared.model  # loads when not given
        with stage(f"Transforming and exporting {display} to ONNX", enabled=progress):
            qmodel = prepared.qmodel
            result = export(qmodel, tmp, model_id=display)
        if prepared.tokenizer is not None:
            prepared.tokenizer.save_pretrained(str(tmp))
        config = loaded_model.config
        return {
            "num_parameters": sum(p.numel() for p in loaded_model.parameters()),
            "model_type": config.model_type,
            "config": config.to_dict(),
            "weights_digest": qmodel.weights_digest,
            "fp16_clipped_values": result.clipped_values,
            "trace_warnings": list(result.trace_warnings),
            "onnx_bytes": sum(p.stat().st_size for p in tmp.glob("model.onnx*")),
        }

    prepared.export = build_artifact(target, manifest, build, required=("model.onnx",), force=force)
    if prepared.export.reused and validate is not None and prepared.tokenizer is not None:
        validate(prepared.tokenizer)
    return prepared


def verify_cached(
    prepared: Prepared,
    *,
    prompt_token_ids: list[list[int]],
    prompt_len: int,
    ctx_len: int,
    steps: int,
    tolerances=None,
    progress: bool = True,
    force: bool = False,
) -> tuple[Built, dict]:
    """HF vs transformed PyTorch vs ONNX Runtime on these prompts, cached beside the export.
    Returns the artifact and the report as a dict (``passed``, ``comparisons``, …)."""
    from dataclasses import asdict

    from qeff.runtime.ort import OrtSession
    from qeff.verification import Tolerances, verify

    tol = tolerances or Tolerances()
    manifest = {
        "stage": "verify",
        "export": prepared.export.manifest.get("inputs"),
        "prompt_token_ids": prompt_token_ids,
        "prompt_len": prompt_len,
        "ctx_len": ctx_len,
        "steps": steps,
        "tolerances": asdict(tol),
    }

    def build(tmp: Path) -> dict:
        model, qmodel = prepared.model, prepared.qmodel
        with stage("Verifying HF vs PyTorch vs ONNX Runtime", enabled=progress):
            session = OrtSession(prepared.onnx_path, batch_size=len(prompt_token_ids), ctx_len=ctx_len)
            report = verify(model, qmodel=qmodel, session=session, prompt_token_ids=prompt_token_ids,
                            prompt_len=prompt_len, ctx_len=ctx_len, steps=steps, tolerances=tol)
        return {"report": report.to_dict()}

    built = build_artifact(prepared.export_dir / f"verify-{manifest_hash(manifest)}", manifest, build, force=force)
    return built, built.manifest["outputs"]["report"]
