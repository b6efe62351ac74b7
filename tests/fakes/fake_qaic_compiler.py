"""Stand-in for the Cloud AI compiler (``qaic-exec`` / ``qaic-compile``) — TESTS ONLY.

Tests put a wrapper named like the real compiler first on PATH; it runs this script. The script
checks what qeff hands the real compiler against the documented formats, then writes a fake
``programqpc.bin`` (JSON) that ``fake_qaicrt`` loads: the ONNX path, the specializations and the
custom IO precisions — so the fake runtime serves exactly what was "compiled".

Checks, each exiting 2 with a message on stderr as a compiler would:
- every argument is one ``-flag`` or ``-flag=value``; the flags a retained-state LLM compile needs
  are all there, ``-compile-only`` included;
- ``-m`` is an ONNX file; ``specializations.json`` holds a ``specializations`` list whose values
  are digit strings (the real compiler rejects integers) keyed by symbolic dims of the graph;
- the custom-IO file has exactly the ``- IOName:`` / ``Precision:`` layout, names only IO of the
  graph, with precision float16 or mxint8;
- a partition config, when given, is the tensor-slicing JSON with ``numCores`` = ``-aic-num-cores``.

``FAKE_QAIC_FAIL=<text>`` makes it print ``<text>`` on stderr and exit ``FAKE_QAIC_EXIT`` (default 1);
``FAKE_QAIC_NO_QPC=1`` makes it exit 0 without writing the QPC.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

REQUIRED = (
    "-m",
    "-aic-hw",
    "-aic-hw-version",
    "-network-specialization-config",
    "-convert-to-fp16",
    "-retained-state",
    "-aic-num-cores",
    "-custom-IO-list-file",
    "-compile-only",
    "-aic-binary-dir",
)
VALUED = {"-m", "-aic-hw-version", "-network-specialization-config", "-aic-num-cores", "-custom-IO-list-file",
          "-aic-binary-dir", "-mos", "-mdp-load-partition-config"}


def fail(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def parse(argv: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    flags: dict[str, str | bool] = {}
    for arg in argv:
        if not arg.startswith("-"):
            fail(f"unexpected argument {arg!r}")
        name, eq, value = arg.partition("=")
        if name in flags:
            fail(f"flag {name} given twice")
        if name in VALUED and not eq:
            fail(f"flag {name} needs a value")
        flags[name] = value if eq else True
    return flags, argv


def graph_io(onnx_path: Path) -> tuple[set[str], set[str]]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    names = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    dims = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    return names, dims


def read_specializations(path: Path, symbols: set[str]) -> list[dict[str, int]]:
    data = json.loads(path.read_text())
    specs = data.get("specializations") if isinstance(data, dict) else None
    if not isinstance(specs, list) or not specs:
        fail(f"{path}: expected a non-empty 'specializations' list")
    out = []
    for spec in specs:
        for key, value in spec.items():
            if key not in symbols:
                fail(f"{path}: {key!r} is not a symbolic dim of the model ({sorted(symbols)})")
            if not isinstance(value, str) or not value.isdigit():
                fail(f"{path}: value of {key!r} must be a string of digits, got {value!r}")
        out.append({k: int(v) for k, v in spec.items()})
    return out


ENTRY = re.compile(r"^ - IOName: (\S+)\n   Precision: (\S+)$")


def read_custom_io(path: Path, io_names: set[str]) -> dict[str, str]:
    entries: dict[str, str] = {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if len(lines) % 2:
        fail(f"{path}: an IOName without its Precision")
    for first, second in zip(lines[0::2], lines[1::2]):
        match = ENTRY.match(f"{first}\n{second}")
        if not match:
            fail(f"{path}: malformed entry {first!r} / {second!r}")
        name, precision = match.groups()
        if name not in io_names:
            fail(f"{path}: {name} is not an input or output of the model")
        if precision not in ("float16", "mxint8"):
            fail(f"{path}: unsupported precision {precision!r} for {name}")
        entries[name] = precision
    return entries


def read_partition(path: Path, num_cores: int) -> int:
    data = json.loads(path.read_text())
    (connection,) = data["connections"]
    (partition,) = data["partitions"]
    devices = [d["deviceId"] for d in partition["devices"]]
    if connection["type"] != "p2p" or sorted(connection["devices"]) != sorted(devices):
        fail(f"{path}: connections do not join the partition's devices peer-to-peer")
    if devices != list(range(len(devices))) or any(d["numCores"] != num_cores for d in partition["devices"]):
        fail(f"{path}: devices must be 0..n-1, each with numCores={num_cores}")
    return len(devices)


def main() -> None:
    flags, argv = parse(sys.argv[1:])
    if os.environ.get("FAKE_QAIC_FAIL"):
        sys.stderr.write(os.environ["FAKE_QAIC_FAIL"] + "\n")
        sys.exit(int(os.environ.get("FAKE_QAIC_EXIT", "1")))
    missing = [f for f in REQUIRED if f not in flags]
    if missing:
        fail(f"missing flag(s) {', '.join(missing)}")
    if flags["-aic-hw-version"] not in ("2.0", "ai100"):
        fail(f"unknown -aic-hw-version {flags['-aic-hw-version']}")
    onnx_path = Path(flags["-m"])
    if not onnx_path.is_file():
        fail(f"no model at {onnx_path}")
    io_names, symbols = graph_io(onnx_path)
    num_cores = int(flags["-aic-num-cores"])
    specs = read_specializations(Path(flags["-network-specialization-config"]), symbols)
    custom_io = read_custom_io(Path(flags["-custom-IO-list-file"]), io_names)
    num_devices = 1
    if "-mdp-load-partition-config" in flags:
        num_devices = read_partition(Path(flags["-mdp-load-partition-config"]), num_cores)
    if os.environ.get("FAKE_QAIC_NO_QPC"):
        return
    out = Path(flags["-aic-binary-dir"])
    out.mkdir(parents=True, exist_ok=False)
    program = {
        "format": "fake-qpc/1",
        "compiler": os.environ.get("FAKE_QAIC_NAME", "qaic-exec"),
        "cwd": os.getcwd(),
        "argv": argv,
        "onnx": str(onnx_path.resolve()),
        "specializations": specs,
        "custom_io": custom_io,
        "num_cores": num_cores,
        "num_devices": num_devices,
    }
    (out / "programqpc.bin").write_text(json.dumps(program, indent=1))
    print(f"fake compile of {onnx_path.name}: {len(specs)} specialization(s), {num_devices} device(s)")


if __name__ == "__main__":
    main()
