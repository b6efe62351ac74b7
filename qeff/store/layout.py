"""Where every artifact lives: the one module that names directories and files of the cache.

    $QEFF_HOME (default ./qeff_models)/
      <model slug>/
        export-<hash>/                       model.onnx, model.onnx.data, tokenizer files, manifest.json
          verify-<hash>/                     manifest.json holding the verification report
          ort_1BS_32PL_128CL/                model.opt.onnx (+ .data), manifest.json
          ort-fused_1BS_32PL_128CL/          model.fused.onnx (+ .data), manifest.json
            check-<hash>/                    manifest.json holding its check against the portable graph
          qpc_16cores_1BS_32PL_128CL_1devices_mxfp6/
                                             specializations.json, custom_io.yaml, compile.sh,
                                             compile.json, compile.log, qpcs/programqpc.bin, manifest.json

Every stage directory holds ``manifest.json`` (see :mod:`qeff.store.artifacts`). The compile directory
names are the ones users of the seed product know (``qpc_16cores_1BS_32PL_128CL_1devices_mxfp6``).
Nothing here touches the disk except :func:`qeff_home` reading the environment.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

__all__ = [
    "CACHE_MARKER",
    "MANIFEST",
    "is_artifact_name",
    "ONNX_FILE",
    "ONNX_DATA",
    "ORT_OPTIMIZED",
    "ORT_FUSED",
    "LOGITS_ROWS",
    "QPC_SUBDIR",
    "QPC_FILE",
    "SPECIALIZATIONS_FILE",
    "CUSTOM_IO_FILE",
    "SCRIPT_FILE",
    "QAIC_MANIFEST_FILE",
    "LOG_FILE",
    "qeff_home",
    "slug",
    "export_dir_name",
    "verify_dir_name",
    "check_dir_name",
    "ort_dir_name",
    "ort_fused_dir_name",
    "qpc_dir_name",
]

#: The file at the root of every cache qeff creates: `qeff doctor` and `qeff clean` look only
#: inside a directory that holds it (issue 19: they deleted every ``*.lock`` of a source tree).
CACHE_MARKER = ".qeff-cache"
#: Every stage directory's record of what produced it.
MANIFEST = "manifest.json"
#: The exported retained-state graph and its external weights.
ONNX_FILE = "model.onnx"
ONNX_DATA = "model.onnx.data"
#: The ONNX Runtime artifact: the graph after ORT's offline optimizer.
ORT_OPTIMIZED = "model.opt.onnx"
#: The fused CPU graph (``qeff.compilers.ort_fused``), built from the model's weights.
ORT_FUSED = "model.fused.onnx"
#: The fused graph's dim of ``last_index`` and of the logits' rows: B for a plain step, B·(K+1) for a
#: verify step (speculative and prompt-lookup decoding).
LOGITS_ROWS = "logits_rows"
#: Cloud AI 100 compile directory: the QPC goes to ``qpcs/`` (what users pass to execute).
QPC_SUBDIR = "qpcs"
QPC_FILE = "programqpc.bin"
SPECIALIZATIONS_FILE = "specializations.json"
CUSTOM_IO_FILE = "custom_io.yaml"
SCRIPT_FILE = "compile.sh"
QAIC_MANIFEST_FILE = "compile.json"
LOG_FILE = "compile.log"


#: The names qeff gives artifact directories (the functions below, the emulated precision tiers'
#: ``tier-<name>``). A lock file, build directory or kept log is qeff's only when its name is one of
#: these plus qeff's suffix or prefix; ``Cargo.lock`` or ``.tmp-build/`` never is.
_ARTIFACT_NAME = re.compile(
    r"(export|verify|check)-[0-9a-f]{3,}"
    r"|ort(-fused[a-z0-9-]*)?_\d+BS\w*"
    r"|qpc_\d+cores_\w+"
    r"|tier-[A-Za-z0-9._-]+"
)


def is_artifact_name(name: str) -> bool:
    """Whether ``name`` is one qeff gives an artifact directory."""
    return _ARTIFACT_NAME.fullmatch(name) is not None


def qeff_home() -> Path:
    """The cache root: ``$QEFF_HOME``, default ``./qeff_models``."""
    return Path(os.environ.get("QEFF_HOME") or "qeff_models").expanduser()


#: The longest model directory name kept as it is. File systems cap one name at 255 bytes (eCryptfs
#: at 143); a model directory at a long path flattened past that could not be cached at all, and
#: the error advised another --home, which cannot help (issue 19). Names up to this length are
#: unchanged, so existing caches keep their paths.
SLUG_MAX = 128
_SLUG_DIGEST = 16


def slug(name: str) -> str:
    """A directory name for a model name, repo id or path: the name with every run of other
    characters turned into ``--``; past :data:`SLUG_MAX` bytes, its readable end (the model's own
    directory name) and a digest of the whole name, so two long paths never share a directory."""
    flat = re.sub(r"[^A-Za-z0-9._-]+", "--", name.strip().strip("/")).strip("-") or "model"
    if len(flat) <= SLUG_MAX:
        return flat
    digest = hashlib.blake2b(name.strip().encode("utf-8", "surrogateescape"), digest_size=_SLUG_DIGEST // 2).hexdigest()
    keep = flat[-(SLUG_MAX - _SLUG_DIGEST - 1):].lstrip("-.") or "model"
    return f"{keep}-{digest}"


def export_dir_name(digest: str) -> str:
    return f"export-{digest}"


def verify_dir_name(digest: str) -> str:
    return f"verify-{digest}"


def check_dir_name(digest: str) -> str:
    """The fused graph's check against the portable graph, nested in the fused graph's directory."""
    return f"check-{digest}"


def _serving_suffix(full_batch_size: int | None, num_speculative_tokens: int | None, sep: str) -> str:
    """``{fbs}FBS`` (continuous batching) and ``{k}NST`` (speculative target), QEfficient's later
    ``_{fbs}fbs_`` / ``_{k}nst_`` in these names' casing; empty for plain compiles."""
    parts = [f"{v}{tag}" for v, tag in ((full_batch_size, "FBS"), (num_speculative_tokens, "NST")) if v is not None]
    return "".join(sep[0] + p + sep[1] for p in parts)


def ort_dir_name(
    *, batch_size: int, prompt_len: int, ctx_len: int, full_batch_size: int | None = None, num_speculative_tokens: int | None = None
) -> str:
    return f"ort_{batch_size}BS_{prompt_len}PL_{ctx_len}CL" + _serving_suffix(full_batch_size, num_speculative_tokens, ("_", ""))


def ort_fused_dir_name(*, batch_size: int, prompt_len: int, ctx_len: int, weights: str = "fp32", int8_activations: bool = False) -> str:
    """``ort-fused_1BS_32PL_128CL``; ``ort-fused-native_…``, ``ort-fused-int4_…``; ``…-a8_…`` with int8 activations."""
    tag = ("" if weights == "fp32" else f"-{weights}") + ("-a8" if int8_activations else "")
    return f"ort-fused{tag}_{batch_size}BS_{prompt_len}PL_{ctx_len}CL"


def qpc_dir_name(
    *,
    num_cores: int,
    batch_size: int,
    prompt_len: int,
    ctx_len: int,
    num_devices: int,
    mxfp6: bool,
    mxint8: bool,
    mos: int | None = None,
    full_batch_size: int | None = None,
    num_speculative_tokens: int | None = None,
) -> str:
    """The Cloud AI compile directory's name, as QEfficient users know it.

    ``qpc_{cores}cores_{bs}BS_{pl}PL_{cl}CL_{n}devices`` + ``_mxfp6`` / ``_mxfp6_mxint8`` /
    ``_fp16_mxint8`` / ``_fp16``, e.g. ``qpc_16cores_1BS_32PL_128CL_2devices_mxfp6`` (QEfficient's
    README and ``cloud/infer.py``). QEfficient later put ``{mos}MOS_`` before the device count;
    here it appears only when ``mos`` is set, so the default name stays the familiar one; so do
    ``{fbs}FBS_`` and ``{k}NST_`` (continuous batching, speculative target), e.g.
    ``qpc_16cores_1BS_32PL_128CL_4FBS_1devices_fp16``. Depth-first, the hardware version and extra flags are not in the name (nor were they in
    QEfficient's): the manifest tells such directories apart.
    """
    mos_part = (f"{mos}MOS_" if mos is not None else "") + _serving_suffix(full_batch_size, num_speculative_tokens, ("", "_"))
    if mxfp6 and mxint8:
        precision = "_mxfp6_mxint8"
    elif mxfp6:
        precision = "_mxfp6"
    elif mxint8:
        precision = "_fp16_mxint8"
    else:
        precision = "_fp16"
    return f"qpc_{num_cores}cores_{batch_size}BS_{prompt_len}PL_{ctx_len}CL_{mos_part}{num_devices}devices{precision}"
