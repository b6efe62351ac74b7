"""Support answered before loading (issue 11, item 3): qeff.intake.headers, qeff.intake.configs, qeff.intake.support and
``qeff check``. References are independent of the code judged: the ``gguf`` package's own reader,
transformers' own GGUF loader, models built by transformers, byte-level read probes."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import qeff
import qeff.intake.configs
from qeff.intake import headers, support
from qeff.cli import main
from qeff.intake.configs import gguf_config, read_config
from qeff.errors import CorruptWeightsError, UnsupportedArchitectureError, UsageError
from qeff.intake.loading import embedded_gguf, resolve
from tests.model_files import truncate, write_config_dir, write_gguf

REPO = Path(__file__).resolve().parents[1]

TINY_LLAMA = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, torch_dtype="float32")


@pytest.fixture(scope="module")
def llama_dir(module_tmp):
    """A real tiny checkpoint (safetensors) and its parameter count, counted by torch."""
    path = module_tmp("tiny-llama")
    model = qeff.from_config("llama", {k: v for k, v in TINY_LLAMA.items() if k != "torch_dtype"}, seed=1)
    model.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


# --- a guard that fails the test if any weight is read --------------------------------------------


class WeightsOpened(AssertionError):
    pass


@pytest.fixture
def no_weights(monkeypatch):
    """Every way weights get read, patched to raise: qeff's loader, transformers' loaders, the
    safetensors and gguf tensor readers, torch.load."""
    import safetensors
    import safetensors.torch
    import transformers
    import transformers.modeling_gguf_pytorch_utils as hf_gguf
    import transformers.modeling_utils as hf_modeling
    import gguf

    def refuse(what):
        def _raise(*args, **kwargs):
            raise WeightsOpened(f"{what} was called: weights were opened")
        return _raise

    targets = [
        (qeff.intake.loading, "load_source"), (transformers.AutoModelForCausalLM, "from_pretrained"),
        (transformers.PreTrainedModel, "from_pretrained"), (safetensors, "safe_open"),
        (safetensors.torch, "load_file"), (safetensors.torch, "load"), (torch, "load"), (gguf, "GGUFReader"),
        (gguf.gguf_reader, "GGUFReader"), (gguf, "dequantize"), (hf_gguf, "load_gguf_checkpoint"),
        (hf_modeling, "load_state_dict"),
    ]
    if hasattr(hf_modeling, "safe_open"):
        targets.append((hf_modeling, "safe_open"))
    for owner, name in targets:
        monkeypatch.setattr(owner, name, refuse(f"{getattr(owner, '__name__', owner)}.{name}"))
    return targets


def test_the_guard_catches_each_way_of_reading_weights(no_weights, llama_dir):
    """The guard is armed: loading the same files the usual ways trips it (the seeded fault)."""
    import safetensors.torch
    import transformers
    from gguf import GGUFReader

    path, _ = llama_dir
    with pytest.raises(WeightsOpened):
        transformers.AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(WeightsOpened):
        safetensors.torch.load_file(path / "model.safetensors")
    with pytest.raises(WeightsOpened):
        GGUFReader(embedded_gguf())
    with pytest.raises(WeightsOpened):
        qeff.load(str(path))


def test_check_reads_no_weights_for_any_source_kind(no_weights, llama_dir, tmp_path):
    path, numel = llama_dir
    local = support.inspect(str(path))
    assert local.supported and local.model_type == "llama" and not local.weights_loaded
    assert local.size["parameters"] == numel and local.size["from"] == "safetensors headers"
    assert local.size["file_bytes"] == numel * 4  # float32 on disk

    gguf_report = support.inspect("smollm2-135m")
    assert gguf_report.supported and gguf_report.model_type == "llama"
    assert gguf_report.size["from"] == "GGUF header"

    # A hub id, through a hub-style cache holding the same checkpoint.
    commit = "0" * 40
    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in path.iterdir():
        (snapshot / f.name).symlink_to(f)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text(commit)
    hub = support.inspect("acme/tiny", cache_dir=str(tmp_path))
    assert hub.source["kind"] == "hub" and hub.supported and hub.size["parameters"] == numel
    support.require_supported(resolve("acme/tiny", cache_dir=str(tmp_path)), cache_dir=str(tmp_path))


# --- header readers against independent references -----------------------------------------------


def test_gguf_header_equals_the_gguf_package_reader():
    """The fast reader and gguf.GGUFReader (the reference) agree on the real SmolLM2 file."""
    from gguf import GGUFReader

    path = embedded_gguf()
    mine = headers.read_gguf_header(path)
    ref = GGUFReader(path)
    assert mine.data_offset == ref.data_offset
    assert [(t.name, t.ggml_type, t.n_elements, t.n_bytes, t.offset + mine.data_offset) for t in mine.tensors] == [
        (t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes), int(t.data_offset)) for t in ref.tensors
    ]
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = mine.metadata[key]
        if isinstance(value, headers.StringArray):
            assert value.count == len(field.data)
        elif isinstance(value, str):
            assert value == field.contents()
        else:
            assert value == pytest.approx(field.contents())


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("llama", {}),
        ("llama", {"name": "mistral"}),  # transformers' rename of a llama.cpp "llama" named mistral
        ("qwen3moe", {"extra": {"qwen3moe.expert_count": 4, "qwen3moe.expert_used_count": 2}}),
        ("gemma3", {"extra": {"gemma3.attention.sliding_window": 512}, "tie": True}),
        ("starcoder2", {}),
    ],
)
def test_gguf_config_equals_transformers_own_loader(tmp_path, arch, kwargs):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = write_gguf(tmp_path / f"{arch}.gguf", arch, **kwargs)
    config, loadable = gguf_config(headers.read_gguf_header(path))
    assert loadable
    assert config == load_gguf_checkpoint(str(path), return_tensors=False)["config"]


def test_gguf_config_of_the_real_file_equals_transformers_own_loader():
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = embedded_gguf()
    assert gguf_config(headers.read_gguf_header(path))[0] == load_gguf_checkpoint(str(path), return_tensors=False)["config"]


class _ReadProbe:
    """An mmap stand-in that records the highest byte read."""

    def __init__(self, real):
        self.real, self.highest = real, 0

    def __len__(self):
        return len(self.real)

    def __getitem__(self, item):
        stop = item.stop if isinstance(item, slice) else item + 1
        self.highest = max(self.highest, min(stop if stop is not None else len(self.real), len(self.real)))
        return self.real[item]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def _probe_mmap(monkeypatch) -> list[_ReadProbe]:
    probes: list[_ReadProbe] = []

    class Probed:
        ACCESS_READ = mmap.ACCESS_READ

        @staticmethod
        def mmap(*args, **kwargs):
            probes.append(_ReadProbe(mmap.mmap(*args, **kwargs)))
            return probes[-1]

    monkeypatch.setattr(headers, "mmap", Probed)
    return probes


def test_gguf_header_read_stops_before_the_tensor_data(monkeypatch):
    path = embedded_gguf()
    probes = _probe_mmap(monkeypatch)
    header = headers.read_gguf_header(path)
    assert probes and 0 < probes[-1].highest <= header.data_offset < header.file_size
    assert header.data_offset < header.file_size / 50  # the header is ~2 % of this file


def test_the_read_probe_sees_a_read_of_tensor_data(monkeypatch):
    """Seeded fault: a reader that touches one byte of the last tensor is seen by the probe."""
    path = embedded_gguf()
    probes = _probe_mmap(monkeypatch)
    header = headers.read_gguf_header(path)
    with open(path, "rb") as f, headers.mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        buf[header.file_size - 1]
    assert probes[-1].highest > header.data_offset


def _probe_open(monkeypatch) -> list[tuple[int, int]]:
    """Replace ``open`` inside qeff.intake.headers by one that records the byte range of every read."""
    reads: list[tuple[int, int]] = []
    real_open = open

    def probing_open(*args, **kwargs):
        handle = real_open(*args, **kwargs)

        class Handle:
            def __getattr__(self, name):
                return getattr(handle, name)

            def read(self, n=-1):
                start = handle.tell()
                data = handle.read(n)
                reads.append((start, start + len(data)))
                return data

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

        return Handle()

    monkeypatch.setattr(headers, "open", probing_open, raising=False)
    return reads


def test_safetensors_header_read_reads_only_the_header(monkeypatch, llama_dir):
    path = llama_dir[0] / "model.safetensors"
    reads = _probe_open(monkeypatch)
    header = headers.read_safetensors_header(path)
    assert reads and max(end for _, end in reads) == header.data_offset < header.file_size


def test_the_open_probe_sees_a_read_of_tensor_data(monkeypatch, llama_dir):
    """Seeded fault: reading the whole file through the same ``open`` is seen past the header."""
    path = llama_dir[0] / "model.safetensors"
    header = headers.read_safetensors_header(path)
    reads = _probe_open(monkeypatch)
    with headers.open(path, "rb") as f:
        f.read()
    assert max(end for _, end in reads) == header.file_size > header.data_offset


# --- corrupt files ----------------------------------------------------------------------------------


def test_corrupt_weight_files_are_named_in_one_sentence(tmp_path, llama_dir):
    good = llama_dir[0] / "model.safetensors"
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CorruptWeightsError, match=r"cut.safetensors is truncated: its header places tensor data up to byte"):
        headers.read_safetensors_header(cut)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    with pytest.raises(CorruptWeightsError, match="not valid JSON"):
        headers.read_safetensors_header(garbage)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptWeightsError, match="announce"):
        headers.read_safetensors_header(huge)
    gg = truncate(write_gguf(tmp_path / "cut.gguf", "llama"), 0.7)
    with pytest.raises(CorruptWeightsError, match="cut.gguf is truncated"):
        headers.read_gguf_header(gg)
    head_only = truncate(write_gguf(tmp_path / "head.gguf", "llama"), 0.01)
    with pytest.raises(CorruptWeightsError, match="runs past the end"):
        headers.read_gguf_header(head_only)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(CorruptWeightsError, match="not a GGUF file"):
        headers.read_gguf_header(not_gguf)


# --- verdicts -------------------------------------------------------------------------------------------


def _verdict(tmp_path, config: dict) -> support.Verdict:
    return support.assess(read_config(resolve(str(write_config_dir(tmp_path / "m", config)))))


def test_verdicts_from_the_config(tmp_path):
    assert _verdict(tmp_path, TINY_LLAMA).supported
    neox = _verdict(tmp_path, {"model_type": "gpt_neox"})
    assert neox.status == "unsupported" and neox.nearest == "llama" and "gpt_neox" in neox.reasons[0]
    unknown = _verdict(tmp_path, {"model_type": "made_up_arch"})
    assert unknown.status == "unknown" and "neither transformers nor qeff knows" in unknown.reasons[0]
    remote = _verdict(tmp_path, {"model_type": "jais", "auto_map": {"AutoModelForCausalLM": "modeling_jais.JAISLMHeadModel"}})
    assert remote.status == "unsupported" and "remote code" in remote.reasons[0] and "modeling_jais" in remote.reasons[0]
    quantized = _verdict(tmp_path, dict(TINY_LLAMA, quantization_config={"quant_method": "gptq", "bits": 4}))
    assert quantized.status == "unsupported" and "gptq" in quantized.reasons[0]
    # The architecture's own refusal (spec.refuse) runs on the config: Falcon's ALiBi variant.
    alibi = _verdict(tmp_path, {"model_type": "falcon", "alibi": True})
    assert alibi.status == "unsupported" and "alibi" in alibi.reasons[0].lower()
    assert _verdict(tmp_path, {"model_type": "falcon", "alibi": False}).supported


def test_the_config_verdict_agrees_with_the_transform_on_every_card():
    """For each card, the config-only verdict is 'supported' exactly when the card expects its
    transform to work (no transform known failure) — and the transform itself agrees on the tiny
    model, so the early answer cannot drift from the late one."""
    from pytest_qeff.cards import default_cards_dir, load_cards

    for card in load_cards(default_cards_dir()).values():
        values = {"model_type": card.architecture, **card.tiny_config().hf_config()}
        config = qeff.intake.configs.ModelConfig(resolve("smollm2-135m"), values, Path(f"{card.id}.toml"))
        verdict = support.assess(config)
        expected = not any(kf.stage == "transform" for kf in card.known_failures)
        assert verdict.supported == expected, (card.id, verdict)
        if verdict.supported:
            qeff.transform(qeff.from_config(card.architecture, card.tiny_config().hf_config(), seed=0))


def test_nearest_family_comes_from_transformers_lineage():
    assert support.nearest_family("gpt_neox") == "llama"  # modular_gpt_neox imports from llama
    assert support.nearest_family("cohere") == "llama"
    assert support.nearest_family("llamma") == "llama"  # a typo: closest name
    assert support.nearest_family("made_up_arch") is None
    assert support.nearest_family("mamba") is None  # no lineage, no config overlap: no near family


def test_features_from_the_config(tmp_path):
    def feats(config, name="m"):
        return support.features(read_config(resolve(str(write_config_dir(tmp_path / name, config)))))

    mistral = feats(dict(TINY_LLAMA, model_type="mistral", sliding_window=16), "mistral")
    assert mistral["sliding_window"] == {"window": 16, "layers": 2, "of": 2} and mistral["gqa_ratio"] == 2
    gemma2 = feats({"model_type": "gemma2", "num_hidden_layers": 4, "sliding_window": 32}, "gemma2")
    assert gemma2["sliding_window"] == {"window": 32, "layers": 2, "of": 4}
    mixtral = feats(dict(TINY_LLAMA, model_type="mixtral", num_local_experts=8, num_experts_per_tok=2), "mixtral")
    assert mixtral["moe"] == {"experts": 8, "per_token": 2}
    scaled = feats(dict(TINY_LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}), "l3")
    assert scaled["rope_scaling"]["rope_type"] == "llama3" and scaled["rope_scaling"]["factor"] == 8.0
    plain = feats(dict(TINY_LLAMA, tie_word_embeddings=True), "tied")
    assert plain["tied_embeddings"] and plain["moe"] is None and plain["sliding_window"] is None and plain["rope_scaling"] is None
    qwen2 = feats(dict(TINY_LLAMA, model_type="qwen2", sliding_window=64, use_sliding_window=False), "qwen2")
    assert qwen2["sliding_window"] is None


def test_parameters_from_config_arithmetic_equal_the_built_model(tmp_path):
    """No weight files: the count comes from the config (meta device) and equals a real build's."""
    report = support.inspect(str(write_config_dir(tmp_path / "cfg-only", dict(TINY_LLAMA, tie_word_embeddings=True))))
    built = qeff.from_config("llama", {k: v for k, v in TINY_LLAMA.items() if k != "torch_dtype"} | {"tie_word_embeddings": True})
    assert report.size["parameters"] == sum(p.numel() for p in built.parameters())
    assert report.size["file_bytes"] == report.size["parameters"] * 4 and "config arithmetic" in report.size["from"]


def test_gguf_features_and_tensor_types(tmp_path):
    path = write_gguf(tmp_path / "f16.gguf", "qwen3moe", tensor_type="F16", tie=True,
                      extra={"qwen3moe.expert_count": 4, "qwen3moe.expert_used_count": 2})
    report = support.inspect(str(path))
    assert report.model_type == "qwen3_moe"
    assert report.features["moe"] == {"experts": 4, "per_token": 2} and report.features["tied_embeddings"]
    header = headers.read_gguf_header(path)
    assert report.features["quantization"] == {"method": "gguf", "file_type": None, "tensor_types": {"F16": len(header.tensors)}}
    assert report.size["parameters"] == header.n_elements == sum(
        int(np.prod(t.shape)) for t in header.tensors
    )


# --- the cards that cover a model --------------------------------------------------------------------------


def test_covering_cards_by_id_repo_and_architecture(llama_dir):
    cards = support.covering_cards(resolve("smollm2-135m"), "llama")
    assert cards[0] == {"id": "smollm2-135m", "covers": "this model"}
    assert {"id": "llama-2-7b-chat", "covers": "same architecture"} in cards
    local = support.covering_cards(resolve(str(llama_dir[0])), "llama")
    assert all(c["covers"] == "same architecture" for c in local) and local


# --- the command ----------------------------------------------------------------------------------------------


def test_qeff_check_json(llama_dir, capsys, no_weights):
    path, numel = llama_dir
    assert main(["check", "--model_name", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["supported"] and report["model_type"] == "llama" and report["features"]["gqa_ratio"] == 2
    assert report["size"]["parameters"] == numel and report["weights_loaded"] is False
    assert any(c["id"] == "llama-2-7b-chat" for c in report["cards"])


def test_qeff_check_text_and_unsupported_exit_1(tmp_path, capsys, no_weights):
    assert main(["check", "-m", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "supported       yes" in out and "Q4_1 x210" in out and "134,515,008" in out and "smollm2-135m (this model)" in out
    neox = write_config_dir(tmp_path / "neox", {"model_type": "gpt_neox", "num_attention_heads": 8, "hidden_size": 64})
    assert main(["check", "-m", str(neox)]) == 1
    out = capsys.readouterr().out
    assert "supported       NO: qeff has no transform for model_type 'gpt_neox'" in out
    assert "nearest supported family: llama" in out and "supported types" in out


def _bad_inputs(tmp_path: Path, llama_dir: Path) -> dict[str, tuple[Path, str]]:
    corrupt = write_config_dir(tmp_path / "corrupt", TINY_LLAMA)
    (corrupt / "model.safetensors").write_bytes((llama_dir / "model.safetensors").read_bytes()[:5000])
    return {
        "corrupt weights": (corrupt, "model.safetensors is truncated"),
        "unknown gguf architecture": (write_gguf(tmp_path / "odd.gguf", "made-up-arch"),
                                      "declares architecture 'made-up-arch', which transformers cannot load from GGUF"),
        "unknown model_type": (write_config_dir(tmp_path / "unknown", {"model_type": "made_up_arch"}),
                               "names model_type 'made_up_arch', which neither transformers nor qeff knows"),
        # Configs no model can be built from (issue 19: `qeff check` said "supported yes"), from each source kind.
        "no layers (gguf)": (write_gguf(tmp_path / "empty.gguf", "llama", layers=0),
                             "empty.gguf: num_hidden_layers must be a positive integer (got 0)"),
        "heads not dividing the hidden size (gguf)": (write_gguf(tmp_path / "odd-heads.gguf", "llama", heads=5, kv_heads=5),
                                                      "hidden_size 64 is not divisible by num_attention_heads 5"),
        "negative layers": (write_config_dir(tmp_path / "negative", {**TINY_LLAMA, "num_hidden_layers": -1}),
                            "num_hidden_layers must be a positive integer (got -1)"),
        "zero vocabulary": (write_config_dir(tmp_path / "zero-vocab", {**TINY_LLAMA, "vocab_size": 0}),
                            "vocab_size must be a positive integer (got 0)"),
        "hidden size not divisible": (write_config_dir(tmp_path / "odd", {**TINY_LLAMA, "hidden_size": 66}),
                                      "hidden_size 66 is not divisible by num_attention_heads 4"),
    }


@pytest.mark.parametrize("kind", ["corrupt weights", "unknown gguf architecture", "unknown model_type", "no layers (gguf)",
                                  "heads not dividing the hidden size (gguf)", "negative layers", "zero vocabulary",
                                  "hidden size not divisible"])
@pytest.mark.parametrize("command", ["check", "infer"])
def test_bad_input_is_one_sentence_exit_2(tmp_path, capsys, llama_dir, no_weights, kind, command):
    path, message = _bad_inputs(tmp_path, llama_dir[0])[kind]
    code = main([command, "--model_name", str(path)] + (["--no-verify"] if command == "infer" else []))
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("qeff: error: ")


def test_unsupported_architecture_with_corrupt_weights_is_refused_by_name_before_loading(tmp_path, capsys, no_weights):
    """The issue's case: the config names an unsupported architecture and the weights are corrupt;
    the answer names the architecture (not a safetensors traceback), the nearest family and the list."""
    path = write_config_dir(tmp_path / "neox", {"model_type": "gpt_neox"}, weights=b"\x00garbage" * 100)
    assert main(["infer", "--model_name", str(path)]) == 2
    err = capsys.readouterr().err
    assert "qeff has no transform for model_type 'gpt_neox'" in err
    assert "the nearest supported family is 'llama'" in err and "supported model types: codegen, " in err
    with pytest.raises(UnsupportedArchitectureError) as info:
        support.require_supported(resolve(str(path)))
    assert info.value.model_type == "gpt_neox" and isinstance(info.value, UsageError)
    assert isinstance(info.value, qeff.errors.UnsupportedModelError)


def test_refusal_in_a_real_process_has_no_traceback(tmp_path):
    path = write_gguf(tmp_path / "odd.gguf", "made-up-arch")
    env = {**os.environ, "QEFF_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "qeff.cli", "infer", "--model_name", str(path)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 2 and "made-up-arch" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("model.onnx"))
