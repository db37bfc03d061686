"""The bundle on disk: checksums name the corrupted file, atomic writes, torch-free loading, Triton config."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fsserve.bundle import BundleError, BundleTokenizer, tokenizer_record, verify_bundle
from fsserve.config import PromptConfig
from fsserve.exporters import bundle as bundle_writer
from fsserve.modeling import PromptModel
from fsserve.predictor import load_bundle_predictor
from fsserve.predictor import Predictor
from fsserve.prompts import Prompt

TEXTS = ["A fine film.", "Dull and far too long.", "Great!", "Not what I hoped for, sadly."]
PROMPT = PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=32)


@pytest.fixture(scope="module")
def bert_bundle(tiny_lm: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[PromptModel, Path]:
    """A tiny BERT bundle with torch weights and a real demonstration pool, exported once."""
    from fsserve.data import Example
    from fsserve.demos import DemoIndex

    lm, tokenizer = tiny_lm("bert")
    model = PromptModel(lm, tokenizer, PROMPT).eval()
    pool = [Example("A gem of a film.", label="1"), Example("A tedious mess.", label="0")]
    model.attach_demos(DemoIndex(pool, labels=["0", "1"]))
    path = model.export(tmp_path_factory.mktemp("bundle") / "bert", torch_weights=True)
    return model, path


def test_manifest_lists_every_file_with_versions(bert_bundle: tuple[PromptModel, Path]) -> None:
    _, path = bert_bundle
    manifest = verify_bundle(path)
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    assert {"model.onnx", "fsserve.json", "tokenizer/tokenizer.json", "demos/demo_index.json", "torch/fsserve.json"} <= set(manifest["files"])
    assert manifest["opset"] == 17 and manifest["onnx_version"] and manifest["onnxruntime_version"] and manifest["fsserve_version"]
    assert manifest["demos"] == "demos" and manifest["torch"] == "torch"
    config = json.loads((path / "fsserve.json").read_text())
    assert config["prompt"]["template"] == PROMPT.template and config["labels"] == ["0", "1"]
    assert config["prompt"]["max_length"] == 32 and "truncate_head" in config["prompt"]


def test_a_corrupted_byte_in_any_file_is_refused_naming_the_file(bert_bundle: tuple[PromptModel, Path], tmp_path: Path) -> None:
    _, path = bert_bundle
    names = sorted(json.loads((path / "manifest.json").read_text())["files"]) + ["manifest.json"]
    for name in names:
        copy = tmp_path / name.replace("/", "_")
        shutil.copytree(path, copy)
        target = copy / name
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        with pytest.raises(BundleError, match=re.escape(str(target))):
            Predictor.from_pretrained(copy, backend="onnx")
        shutil.rmtree(copy)


def test_missing_and_unlisted_files_are_refused(bert_bundle: tuple[PromptModel, Path], tmp_path: Path) -> None:
    _, path = bert_bundle
    copy = tmp_path / "b"
    shutil.copytree(path, copy)
    (copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json is missing"):
        verify_bundle(copy)
    shutil.copy2(path / "tokenizer" / "tokenizer.json", copy / "tokenizer" / "tokenizer.json")
    (copy / "extra.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"extra\.onnx is not listed"):
        verify_bundle(copy)
    with pytest.raises(BundleError, match="not an fsserve bundle"):
        verify_bundle(tmp_path)


@pytest.mark.parametrize("fail_in", ["write_manifest", "save_pretrained"])
def test_interrupted_export_leaves_the_destination_untouched(bert_bundle: tuple[PromptModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_in: str) -> None:
    model, path = bert_bundle
    dest = tmp_path / "dest"
    shutil.copytree(path, dest)
    before = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}

    def boom(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("simulated crash half-way through the export")

    if fail_in == "write_manifest":
        monkeypatch.setattr(bundle_writer, "write_manifest", boom)
    else:
        monkeypatch.setattr(model, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        model.export(dest, torch_weights=True)
    with pytest.raises(KeyboardInterrupt):
        model.export(tmp_path / "fresh", torch_weights=True)
    after = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["dest"]  # no half bundle, no temporary leftovers
    verify_bundle(dest)


def test_onnx_and_torch_backends_of_one_bundle_agree(bert_bundle: tuple[PromptModel, Path]) -> None:
    model, path = bert_bundle
    onnx_pred = Predictor.from_pretrained(path, backend="onnx", intra_op_num_threads=1)
    torch_pred = Predictor.from_pretrained(path, backend="torch")
    np.testing.assert_allclose(onnx_pred.label_logits(TEXTS), torch_pred.label_logits(TEXTS), atol=1e-4)
    np.testing.assert_allclose(onnx_pred.label_logits(TEXTS), model.predict_logits(TEXTS).numpy(), atol=1e-4)
    assert onnx_pred.predict("A fine film.") in ("0", "1")


def test_onnx_backend_refuses_unknown_devices_and_missing_providers(bert_bundle: tuple[PromptModel, Path]) -> None:
    from fsserve.runtime.onnx import available_providers

    _, path = bert_bundle
    with pytest.raises(ValueError, match="unknown device"):
        load_bundle_predictor(path, backend="onnx", device="tpu")
    if "TensorrtExecutionProvider" not in available_providers():
        with pytest.raises(ValueError, match="TensorrtExecutionProvider"):
            load_bundle_predictor(path, backend="onnx", device="tensorrt")
    with pytest.raises(ValueError, match="intra_op_num_threads"):
        load_bundle_predictor(path, backend="onnx", intra_op_num_threads=-1)


def test_torch_backend_needs_the_bundled_weights(tiny_lm: Any, tmp_path: Path) -> None:
    lm, tokenizer = tiny_lm("roberta")
    path = PromptModel(lm, tokenizer, PROMPT).export(tmp_path / "b", torch_weights=False, optimize=False)
    with pytest.raises(BundleError, match="torch_weights=True"):
        Predictor.from_pretrained(path, backend="torch")


@pytest.mark.parametrize("arch", ["bert", "gemma"])
def test_tokenizer_adapter_encodes_prompts_like_the_hf_tokenizer(tiny_lm: Any, tmp_path: Path, arch: str) -> None:
    _, tokenizer = tiny_lm(arch)
    tokenizer.save_pretrained(tmp_path)
    adapter = BundleTokenizer.from_folder(tmp_path, tokenizer_record(tokenizer))
    kind = "mlm" if arch == "bert" else "causal"
    config = PromptConfig("*cls**sent_0*_It_was*mask*.*sep+*", {"0": "terrible", "1": "great"}, max_length=16)
    texts = TEXTS + ["naïve — café crème, 3.5/10 " * 6]
    ours, theirs = Prompt(config, adapter, kind), Prompt(config, tokenizer, kind)
    assert ours.label_word_ids == theirs.label_word_ids
    assert ours.encode(texts) == theirs.encode(texts)


def test_onnx_prediction_never_imports_torch(tiny_lm: Any, tmp_path: Path) -> None:
    # Without demonstrations (their sentence encoder is a torch model), the onnx path needs no torch.
    lm, tokenizer = tiny_lm("bert")
    model = PromptModel(lm, tokenizer, PROMPT).eval()
    path = model.export(tmp_path / "plain", torch_weights=False)
    code = textwrap.dedent(
        f"""
        import json, sys
        from fsserve.predictor import Predictor
        predictor = Predictor.from_pretrained({str(path)!r}, backend="onnx", device="auto")
        probs = predictor.predict_proba({TEXTS!r})
        print(json.dumps({{"torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules, "probs": probs.tolist()}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["torch"] is False and report["transformers"] is False
    np.testing.assert_allclose(report["probs"], model.predict_proba(TEXTS).numpy(), atol=1e-5)


def test_triton_repository_config_matches_the_graph(bert_bundle: tuple[PromptModel, Path], tmp_path: Path) -> None:
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from fsserve.exporters.triton_repository import export_triton_repository, graph_signature

    model, path = bert_bundle
    target = export_triton_repository(path, tmp_path / "repo", model_name="sst2", kind="KIND_GPU", instance_count=2)
    assert (target / "1" / "model.onnx").read_bytes() == (path / "model.onnx").read_bytes()
    config = text_format.Parse((target / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "sst2" and config.platform == "onnxruntime_onnx" and config.max_batch_size >= 8
    assert config.HasField("dynamic_batching") and list(config.dynamic_batching.preferred_batch_size) == [8, 32]
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    inputs = {i.name: i for i in config.input}
    graph_inputs, graph_outputs = graph_signature(path / "model.onnx")
    assert set(inputs) == {g["name"] for g in graph_inputs} == {"input_ids", "attention_mask", "answer_pos", "token_type_ids"}
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert inputs[name].data_type == model_config_pb2.TYPE_INT64 and list(inputs[name].dims) == [-1]
    assert inputs["answer_pos"].data_type == model_config_pb2.TYPE_INT64
    assert list(inputs["answer_pos"].dims) == [1] and list(inputs["answer_pos"].reshape.shape) == []
    (output,) = config.output
    assert [g["name"] for g in graph_outputs] == [output.name] == ["label_logits"]
    assert output.data_type == model_config_pb2.TYPE_FP32 and list(output.dims) == [len(model.labels)]
