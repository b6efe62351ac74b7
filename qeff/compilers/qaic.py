"""Compile a retained-state ONNX graph into a QPC for Qualcomm Cloud AI 100.

One call writes everything the SDK compiler reads into a compile directory, then runs it there::

    qpc_16cores_1BS_32PL_128CL_2devices_mxfp6/   (the name users know: :func:`qpc_dir_name`)
        specializations.json    the shapes to build: prefill (seq_len = prompt_len), then decode (1)
        custom_io.yaml          every past_* input and *_RetainedState output kept as float16/mxint8
        mdp_ts_2.json           tensor slicing over the device group (only with 2+ devices)
        compile.sh              the exact command, runnable by hand from anywhere
        compile.json            the manifest: options, compiler, command, files
        compile.log             the compiler's stdout and stderr (after a real run)
        qpcs/programqpc.bin     the QPC (``-aic-binary-dir``)

The command names the files by paths relative to the compile directory and runs with it as the
working directory, so the directory can be built in a temporary place and renamed into a cache
without its manifest or ``compile.sh`` going stale. ``dry_run=True`` writes all of it except the
QPC and needs no SDK.

Facts this module relies on (checked against documents, not yet against hardware; see
``docs/cloud-ai-100.md``):

- Flags, their spellings and order, ``-compile-only``, the QPC subdirectory ``qpcs`` and the rule
  that a prompt_len of 1 leaves only one specialization: QEfficient's
  ``QEfficient/compile/compile_helper.py`` (quic/efficient-transformers, 2024), which invokes
  ``/opt/qti-aic/exec/qaic-exec`` with ``-m= -aic-hw -aic-hw-version=2.0
  -network-specialization-config= -convert-to-fp16 -retained-state -aic-num-cores=
  -custom-IO-list-file= -compile-only -aic-binary-dir=`` and then ``-mxfp6-matmul``, ``-mos=``
  (only when > 0), ``-aic-enable-depth-first``, ``-mdp-load-partition-config=``.
- ``specializations.json`` (values are strings; the compiler rejects integers) and the custom-IO
  YAML layout (`` - IOName: …`` / ``   Precision: …``, inputs then outputs): the Cloud AI SDK page
  "Large Language Models" (cloud-ai-sdk-pages, Model-Architecture-Support/Large-Language-Models).
- The multi-device partition file (``connections`` of ``devices`` + ``type`` ``"p2p"``;
  ``partitions`` of ``name`` + ``devices`` of ``deviceId``/``numCores``; several devices in one
  partition = tensor slicing): the SDK page "MDP Load Partition Configuration" (qaic-compile
  tools) and QEfficient's generated ``mdp_ts_config.json``.
- ``qaic-compile`` is the compiler of newer Apps SDKs (SDK docs 80-99100-3, "Compile the model");
  the public ``qaic-compile`` invocations found (build scripts against SDK 1.21, later QEfficient)
  all spell the hardware ``-aic-hw-version=ai100`` and still pass ``-compile-only``. Older SDKs
  ship ``qaic-exec``, documented with ``2.0`` (later QEfficient passes it ``ai100`` too).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from qeff import sdk

from qeff.store import layout
from qeff._version import __version__
from qeff.errors import ArtifactError, BackendUnavailableError, CompileError, UsageError
# File names of the compile directory: one definition, in the layout module.
from qeff.store.layout import CUSTOM_IO_FILE, LOG_FILE, QPC_FILE, QPC_SUBDIR, SCRIPT_FILE, SPECIALIZATIONS_FILE
from qeff.store.layout import QAIC_MANIFEST_FILE as MANIFEST_FILE

__all__ = [
    "QaicCompileOptions",
    "QaicCompileResult",
    "compile",
    "qpc_dir_name",
    "default_hw_version",
    "specializations",
    "retained_state_names",
    "check_serving_inputs",
    "custom_io",
    "custom_io_yaml",
    "mdp_ts_config",
    "build_command",
    "QPC_SUBDIR",
]

log = logging.getLogger(__name__)

#: The symbolic dims the specializations bind; the export names them so.
SYMBOLS = ("batch_size", "seq_len", "ctx_len")

# Flags this module owns (→ the option that sets them, None = always set); passing one through
# ``extra_options`` would repeat or contradict it.
_MANAGED_FLAGS = {
    "-m": "the onnx_path argument",
    "-model": "the onnx_path argument",
    "-aic-hw": None,
    "-aic-hw-version": "aic_hw_version=",
    "-network-specialization-config": "batch_size=/prompt_len=/ctx_len=/full_batch_size=/num_speculative_tokens=/comp_ctx_lengths=",
    "-convert-to-fp16": None,
    "-retained-state": None,
    "-aic-num-cores": "num_cores=",
    "-custom-IO-list-file": "mxint8= (the file is generated)",
    "-compile-only": None,
    "-aic-binary-dir": "the out_dir argument",
    "-mxfp6-matmul": "mxfp6=True",
    "-mos": "mos=",
    "-aic-enable-depth-first": "aic_enable_depth_first=True",
    "-mdp-load-partition-config": "num_devices=",
}


@dataclass(frozen=True)
class QaicCompileOptions:
    """What to compile for. Defaults are QEfficient's (``infer``: 1 / 32 / 128, no mx formats)."""

    batch_size: int = 1
    #: The prefill chunk length (``seq_len`` of the first specialization); 1 = decode-only QPC.
    prompt_len: int = 32
    #: Cache slots per row: the longest prompt + generation the QPC can hold.
    ctx_len: int = 128
    #: AI cores per device (``-aic-num-cores``); ``/opt/qti-aic/tools/qaic-util -q`` shows a card's.
    num_cores: int = 16
    #: Devices in the group the QPC is tensor-sliced over (the runtime's device ids come later).
    num_devices: int = 1
    #: Weights of MatMuls in MXFP6 (``-mxfp6-matmul``).
    mxfp6: bool = False
    #: The retained cache (past_* and *_RetainedState) in MXINT8 instead of float16 (custom IO).
    mxint8: bool = False
    #: ``-mos=N``, the effort to reduce on-chip memory; None (or QEfficient's -1) = not passed.
    mos: int | None = None
    #: ``-aic-enable-depth-first``.
    aic_enable_depth_first: bool = False
    #: ``-aic-hw-version``; None = the spelling the compiler found documents (see default_hw_version).
    aic_hw_version: str | None = None
    #: Further compiler flags passed through verbatim, e.g. ``("-stats-level=70",)``.
    extra_options: tuple[str, ...] = field(default_factory=tuple)
    #: Continuous batching: the cache's slots (the graph needs ``batch_index``); prefill then runs
    #: one prompt (``batch_size`` 1) and decode every slot.
    full_batch_size: int | None = None
    #: Speculative-decoding target: decode verifies K+1 positions (the graph needs ``num_logits_to_keep``).
    num_speculative_tokens: int | None = None
    #: Compute-context ladder (the graph needs ``comp_ctx_lengths``): one prefill and one decode
    #: specialization per length, each attending that many cache slots; the last is ctx_len.
    comp_ctx_lengths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.mos is not None and self.mos <= 0:
            object.__setattr__(self, "mos", None)  # QEfficient spells "not set" as -1
        object.__setattr__(self, "extra_options", tuple(self.extra_options))
        for name in ("batch_size", "prompt_len", "ctx_len", "num_cores", "num_devices"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer (got {value!r})")
        for name in ("full_batch_size", "num_speculative_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{name} must be a positive integer (got {value!r})")
        if self.comp_ctx_lengths is not None:
            from qeff.serving.ctx_ladder import parse_ladder

            object.__setattr__(self, "comp_ctx_lengths", parse_ladder(list(self.comp_ctx_lengths), self.ctx_len))
        if self.full_batch_size is not None and self.batch_size != 1:
            raise UsageError(
                f"batch_size={self.batch_size} with full_batch_size={self.full_batch_size}: with continuous batching "
                f"prefill runs one prompt at a time and decode runs full_batch_size slots; leave batch_size at 1"
            )
        if self.num_speculative_tokens is not None and self.num_speculative_tokens + 1 > self.ctx_len:
            raise UsageError(f"num_speculative_tokens={self.num_speculative_tokens} needs ctx_len above it (got {self.ctx_len})")
        if self.prompt_len > self.ctx_len:
            raise UsageError(
                f"prompt_len={self.prompt_len} is larger than ctx_len={self.ctx_len}: a prefill chunk "
                f"must fit in the cache; use a smaller prompt_len or a larger ctx_len"
            )
        for option in self.extra_options:
            if not isinstance(option, str) or not option.startswith("-"):
                raise UsageError(f"extra compiler option {option!r} must be one flag starting with '-', e.g. '-stats-level=70'")
            flag = option.split("=", 1)[0]
            if flag in _MANAGED_FLAGS:
                instead = _MANAGED_FLAGS[flag]
                hint = f"use {instead} instead" if instead else "drop it: qeff always passes it"
                raise UsageError(f"extra compiler option {option!r} is set by qeff itself; {hint}")

    def to_dict(self) -> dict:
        """Builtin-typed, for manifests and cache keys (the serving options only when set, so the
        keys of plain compiles stay what they were)."""
        out = asdict(self)
        out["extra_options"] = list(self.extra_options)
        for name in ("full_batch_size", "num_speculative_tokens", "comp_ctx_lengths"):
            if out[name] is None:
                del out[name]
            elif name == "comp_ctx_lengths":
                out[name] = list(out[name])
        return out


@dataclass(frozen=True)
class QaicCompileResult:
    out_dir: Path
    #: The QPC directory (``out_dir/qpcs``): what :class:`qeff.runtime.qaic.QaicSession` opens.
    qpc_dir: Path
    #: argv of the compiler; file paths are relative to ``out_dir``, where it runs.
    command: list[str]
    manifest: dict
    dry_run: bool

    def shell_command(self) -> str:
        """One line a user can paste into a shell to run the compile by hand."""
        return f"cd {shlex.quote(str(self.out_dir))} && {shlex.join(self.command)}"


def qpc_dir_name(options: QaicCompileOptions) -> str:
    """The compile directory's name users know (see :func:`qeff.store.layout.qpc_dir_name`)."""
    o = options
    return layout.qpc_dir_name(num_cores=o.num_cores, batch_size=o.batch_size, prompt_len=o.prompt_len, ctx_len=o.ctx_len,
                               num_devices=o.num_devices, mxfp6=o.mxfp6, mxint8=o.mxint8, mos=o.mos,
                               full_batch_size=o.full_batch_size, num_speculative_tokens=o.num_speculative_tokens)


def default_hw_version(compiler: str | os.PathLike) -> str:
    """``ai100`` for ``qaic-compile`` (how every published invocation spells it), ``2.0`` for
    ``qaic-exec`` (the SDK's LLM guide and QEfficient 2024)."""
    return "ai100" if Path(compiler).name == "qaic-compile" else "2.0"


def specializations(options: QaicCompileOptions) -> dict:
    """Prefill then decode, values as strings; only one entry when the two would be the same.

    Continuous batching (QEfficient's ``create_and_dump_specializations``): both entries bind
    ``full_batch_size`` (the cache's slots), prefill runs ``batch_size`` (1) rows and decode
    ``full_batch_size``. A compute-context ladder (QEfficient's ``comp_ctx_lengths_prefill`` /
    ``_decode``, here one ladder for both) repeats prefill, then decode, once per length, each
    entry binding ``comp_ctx_lengths``. A speculative target (QEfficient's ``build_decode_specialization`` for a
    TLM) binds ``num_logits_to_keep``: 1 for prefill, K+1 for decode, whose ``seq_len`` is K+1.
    """
    o = options
    decode_len = (o.num_speculative_tokens + 1) if o.num_speculative_tokens is not None else 1
    prefill = {"batch_size": o.batch_size, "seq_len": o.prompt_len, "ctx_len": o.ctx_len}
    decode = {"batch_size": o.full_batch_size or o.batch_size, "seq_len": decode_len, "ctx_len": o.ctx_len}
    if o.full_batch_size is not None:
        prefill["full_batch_size"] = decode["full_batch_size"] = o.full_batch_size
    if o.num_speculative_tokens is not None:
        prefill["num_logits_to_keep"], decode["num_logits_to_keep"] = 1, decode_len
    if o.comp_ctx_lengths is not None:
        # QEfficient's compute-context-length layout: every prefill entry (one per length), then
        # every decode entry, each binding ``comp_ctx_lengths`` to the slots it attends.
        entries = [dict(prefill, comp_ctx_lengths=c) for c in o.comp_ctx_lengths]
        if decode != prefill:
            entries += [dict(decode, comp_ctx_lengths=c) for c in o.comp_ctx_lengths]
    else:
        entries = [prefill] if decode == prefill else [prefill, decode]
    return {"specializations": [{k: str(v) for k, v in e.items()} for e in entries]}


def retained_state_names(onnx_path: str | os.PathLike) -> list[str]:
    """Every ``past_*`` input then every ``*_RetainedState`` output of the graph, in graph order.

    Checks the retained-state contract the compile depends on: each ``past_X`` has its
    ``past_X_RetainedState``, and the inputs carry the symbolic dims the specializations bind.
    """
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise ArtifactError(f"ONNX model {path} does not exist; export the model first")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ArtifactError(f"ONNX model {path} cannot be read: {exc}") from exc
    inputs = [i.name for i in model.graph.input if i.name.startswith("past_")]
    outputs = [o.name for o in model.graph.output if o.name.endswith("_RetainedState")]
    if not inputs:
        raise ArtifactError(f"{path} has no past_* inputs: it is not a retained-state graph (export it with qeff)")
    unmatched = sorted(set(inputs) ^ {o[: -len("_RetainedState")] for o in outputs})
    if unmatched:
        raise ArtifactError(f"{path}: retained-state inputs and outputs do not pair up for {', '.join(unmatched)}")
    dims = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    missing = [s for s in SYMBOLS if s not in dims]
    if missing:
        raise ArtifactError(f"{path} has no symbolic dim(s) {', '.join(missing)}; the specializations bind them")
    return inputs + outputs


def check_serving_inputs(onnx_path: str | os.PathLike, options: QaicCompileOptions) -> None:
    """The graph must have the inputs and dims the serving specializations bind (and no others)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    dims = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    for option, name, dim, flag in (
        ("full_batch_size", "batch_index", "full_batch_size", "continuous_batching"),
        ("num_speculative_tokens", "num_logits_to_keep", "num_logits_to_keep", "speculative"),
        ("comp_ctx_lengths", "comp_ctx_lengths", "comp_ctx_lengths", "comp_ctx"),
    ):
        wanted = getattr(options, option) is not None
        if wanted and not (name in inputs and dim in dims):
            raise ArtifactError(
                f"{onnx_path} has no {name} input with a {dim} dim, which {option}= needs; export it with "
                f"qeff.export(..., variant=GraphVariant({flag}=True))"
            )
        if not wanted and name in inputs:
            raise ArtifactError(f"{onnx_path} has a {name} input: compile it with {option}=")


def custom_io(names: list[str], *, mxint8: bool) -> dict[str, str]:
    """IO name → precision for the retained cache: ``mxint8`` or ``float16``."""
    precision = "mxint8" if mxint8 else "float16"
    return {name: precision for name in names}


def custom_io_yaml(mapping: dict[str, str]) -> str:
    """The custom-IO list file, laid out as the SDK's LLM guide shows it."""
    groups = [
        ("# Model Inputs", [n for n in mapping if not n.endswith("_RetainedState")]),
        ("# Model Outputs", [n for n in mapping if n.endswith("_RetainedState")]),
    ]
    lines = []
    for title, names in groups:
        lines += [title, ""]
        for name in names:
            lines += [f" - IOName: {name}", f"   Precision: {mapping[name]}", ""]
    return "\n".join(lines)


def mdp_ts_config(num_devices: int, num_cores: int) -> dict:
    """Tensor slicing over ``num_devices`` logical devices joined peer-to-peer, one partition."""
    devices = list(range(num_devices))
    return {
        "connections": [{"devices": devices, "type": "p2p"}],
        "partitions": [{"name": "Partition0", "devices": [{"deviceId": d, "numCores": num_cores} for d in devices]}],
    }


def mdp_file_name(num_devices: int) -> str:
    return f"mdp_ts_{num_devices}.json"


def build_command(compiler: str | os.PathLike, onnx_path: str | os.PathLike, options: QaicCompileOptions) -> list[str]:
    """The compiler's argv; the files it names are relative to the compile directory."""
    o = options
    hw = o.aic_hw_version or default_hw_version(compiler)
    command = [
        str(compiler),
        f"-m={onnx_path}",
        "-aic-hw",
        f"-aic-hw-version={hw}",
        f"-network-specialization-config={SPECIALIZATIONS_FILE}",
        "-convert-to-fp16",
        "-retained-state",
        f"-aic-num-cores={o.num_cores}",
        f"-custom-IO-list-file={CUSTOM_IO_FILE}",
        # qaic-exec compiles *and runs* unless told not to; qaic-compile accepts the flag too.
        "-compile-only",
        f"-aic-binary-dir={QPC_SUBDIR}",
    ]
    if o.mxfp6:
        command.append("-mxfp6-matmul")
    if o.mos is not None:
        command.append(f"-mos={o.mos}")
    if o.aic_enable_depth_first:
        command.append("-aic-enable-depth-first")
    if o.num_devices > 1:
        command.append(f"-mdp-load-partition-config={mdp_file_name(o.num_devices)}")
    command.extend(o.extra_options)
    return command


def _script(command: list[str], dir_name: str) -> str:
    return "\n".join(
        [
            "#!/bin/sh",
            f"# Compiles {dir_name} for Cloud AI 100 (written by qeff). Runs from anywhere:",
            "# the files it names sit next to this script.",
            "set -e",
            'cd "$(dirname "$0")"',
            f"rm -rf {QPC_SUBDIR}",
            "exec " + " \\\n    ".join(shlex.quote(a) for a in command),
            "",
        ]
    )


def _write(path: Path, text: str) -> None:
    from qeff.store.atomic import write_text

    write_text(path, text)  # a dry run writes into a directory users may share: never a torn file


def compile(
    onnx_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: QaicCompileOptions | None = None,
    *,
    dry_run: bool = False,
    compiler: str | os.PathLike | None = None,
    timeout_s: float | None = None,
) -> QaicCompileResult:
    """Write the compile directory ``out_dir`` for ``onnx_path`` and, unless ``dry_run``, run the compiler.

    ``compiler`` defaults to :func:`qeff.sdk.require_compiler`; a dry run without an SDK names
    ``/opt/qti-aic/exec/qaic-exec``. Raises :class:`CompileError` (with the command, exit code and
    stderr) when the compiler fails or writes no QPC, :class:`BackendUnavailableError` when no
    compiler is found, :class:`ArtifactError` when the ONNX file is missing or not retained-state.
    """
    options = options or QaicCompileOptions()
    onnx_path = Path(onnx_path).resolve()
    out_dir = Path(out_dir).resolve()
    if compiler is not None:
        compiler = Path(compiler)
        if not dry_run and not (compiler.is_file() and os.access(compiler, os.X_OK)):
            raise BackendUnavailableError(f"Cloud AI compiler {compiler} does not exist or is not executable")
    else:
        try:
            compiler = sdk.require_compiler()
        except BackendUnavailableError:
            if not dry_run:
                raise
            compiler = Path(sdk.EXEC_DIR) / "qaic-exec"
    options = replace(options, aic_hw_version=options.aic_hw_version or default_hw_version(compiler))
    names = retained_state_names(onnx_path)
    check_serving_inputs(onnx_path, options)

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("mdp_ts_*.json"), out_dir / LOG_FILE]:
        stale.unlink(missing_ok=True)  # left by an earlier compile into this directory
    spec = specializations(options)
    _write(out_dir / SPECIALIZATIONS_FILE, json.dumps(spec, indent=4) + "\n")
    _write(out_dir / CUSTOM_IO_FILE, custom_io_yaml(custom_io(names, mxint8=options.mxint8)))
    files = {"specializations": SPECIALIZATIONS_FILE, "custom_io": CUSTOM_IO_FILE, "mdp_ts_config": None, "qpc_dir": QPC_SUBDIR}
    if options.num_devices > 1:
        files["mdp_ts_config"] = mdp_file_name(options.num_devices)
        _write(out_dir / files["mdp_ts_config"], json.dumps(mdp_ts_config(options.num_devices, options.num_cores), indent=4) + "\n")
    command = build_command(compiler, onnx_path, options)
    dir_name = qpc_dir_name(options)
    script = out_dir / SCRIPT_FILE
    _write(script, _script(command, dir_name))
    script.chmod(0o755)
    manifest = {
        "backend": "qaic",
        "qeff_version": __version__,
        "dir_name": dir_name,
        "options": options.to_dict(),
        "compiler": {"name": compiler.name, "path": str(compiler)},
        "onnx_path": str(onnx_path),
        "command": command,
        "files": files,
        "specializations": spec["specializations"],
    }
    _write(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    result = QaicCompileResult(out_dir=out_dir, qpc_dir=out_dir / QPC_SUBDIR, command=command, manifest=manifest, dry_run=dry_run)
    if dry_run:
        return result

    qpc_dir = out_dir / QPC_SUBDIR
    if qpc_dir.exists():
        shutil.rmtree(qpc_dir)  # a stale QPC must never pass for this compile's output
    log.info("running the Cloud AI compiler: %s", result.shell_command())
    try:
        proc = subprocess.run(command, cwd=out_dir, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise CompileError(
            f"{compiler.name} did not finish within {timeout_s} s compiling {onnx_path}", command=command, stderr=stderr
        ) from exc
    except OSError as exc:
        raise CompileError(f"{compiler} could not be started: {exc}", command=command) from exc
    _write(out_dir / LOG_FILE, f"$ {result.shell_command()}\n--- stdout ---\n{proc.stdout}--- stderr ---\n{proc.stderr}")
    if proc.returncode != 0:
        raise CompileError(
            f"{compiler.name} failed with exit code {proc.returncode} compiling {onnx_path}: "
            f"{_last_line(proc.stderr) or _last_line(proc.stdout) or 'no output'} (full log: {out_dir / LOG_FILE})",
            command=command,
            returncode=proc.returncode,
            stderr=proc.stderr,
        )
    if not (qpc_dir / QPC_FILE).is_file():
        raise CompileError(
            f"{compiler.name} exited 0 but wrote no {QPC_SUBDIR}/{QPC_FILE} in {out_dir} (full log: {out_dir / LOG_FILE})",
            command=command,
            returncode=proc.returncode,
            stderr=proc.stderr,
        )
    return result


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""
