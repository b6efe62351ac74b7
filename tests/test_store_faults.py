"""Issue 19, the cache/store half: wrong results served or user data destroyed, one class per case.

Each case was first reproduced here by a test that failed on the code before its fix:

- ``TestLookalikeUserFiles``: `qeff clean` / `qeff doctor` on a directory that is not a qeff
  cache (and on user files nested inside one) deleted every ``*.lock`` and ``.tmp-*``;
- ``TestSourceReplacedInPlace``: weights replaced by others of the same size, mtime restored,
  served the old model's tokens (the source was identified by size and mtime alone);
- ``TestEditedTokenizerUnderExecute``: `qeff execute` read the export's tokenizer unchecked;
- ``TestExportReplacedByAFile``: "Not a directory" on every run, invisible to doctor and clean;
- ``TestLongModelPath``: a model directory at a long path could not be cached at all.

The model is :mod:`tests.test_fault_injection`'s micro Llama (a ~0.3 MB export).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from qeff.cli import main
from tests.test_fault_injection import micro_model_dir  # noqa: F401  (the module-scoped fixture)

ARGS = ["--prompt", "Hello there", "--ctx_len", "48", "--prompt_len", "8", "--generation_len", "6", "--no-stream", "--json"]


def _run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    result = json.loads(lines[-1]) if code == 0 and lines and lines[-1].startswith("{") else None
    return code, result, out.err


def _last_line(err: str) -> str:
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


class TestLongModelPath:
    """A 300-byte model path flattened to a 300-byte directory name: ENAMETOOLONG, and advice to
    pick another --home, which cannot help."""

    def test_a_model_at_a_300_byte_path_is_cached_under_a_short_unique_name(self, micro_model_dir, tmp_path, capsys):
        from qeff.layout import SLUG_MAX

        deep = tmp_path
        while len(str(deep)) < 300:
            deep = deep / ("segment-" + "x" * 60)
        model = deep / "my-micro-model"
        shutil.copytree(micro_model_dir, model)
        assert len(str(model).encode()) > 300
        home = tmp_path / "home"
        code, result, err = _run(capsys, "infer", "--model_name", str(model), "--home", str(home), *ARGS, "--no-verify")
        assert code == 0, err
        model_dir = Path(result["artifact"]).parent.parent
        assert model_dir.parent == home and len(model_dir.name.encode()) <= SLUG_MAX
        assert "my-micro-model" in model_dir.name  # the readable end of the path
        # Another long path with the same tail gets its own directory (the digest suffix).
        other = tmp_path / ("elsewhere-" + "y" * 200) / "segment" / "my-micro-model"
        shutil.copytree(micro_model_dir, other)
        code, again, err = _run(capsys, "infer", "--model_name", str(other), "--home", str(home), *ARGS, "--no-verify")
        assert code == 0, err
        assert Path(again["artifact"]).parent.parent != model_dir and again["token_ids"] == result["token_ids"]

    def test_short_names_keep_their_directory(self):
        from qeff.layout import slug

        assert slug("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB--SmolLM2-135M-Instruct"
        assert slug("/a/b/model") == "a--b--model"
