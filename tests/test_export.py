"""The exported label-logits graph against torch: every family, both padding sides, int8, fp16, TensorRT, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from fsserve.config import PromptConfig
from fsserve.exporters import onnx as ox
from fsserve.modeling import PromptModel
from fsserve.predictor import Predictor

TEXTS = ["A fine film.", "Dull, slow and far too long for what it has to say about anything at all.", "Great!", "It was not good"]
SST2_PROMPT = PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=48)


def _model(tiny_lm: Any, arch: str) -> PromptModel:
    """A tiny PromptModel of one family, with the SST-2 style prompt."""
    lm, tokenizer = tiny_lm(arch)
    return PromptModel(lm, tokenizer, SST2_PROMPT).eval()


@pytest.fixture(scope="module")
def exported(tiny_lm: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Factory: one fp32 bundle per family (exported once, validated by the exporter itself)."""
    cache: dict[str, tuple[PromptModel, Path]] = {}

    def build(arch: str) -> tuple[PromptModel, Path]:
        if arch not in cache:
            model = _model(tiny_lm, arch)
            path = model.export(tmp_path_factory.mktemp(f"bundle-{arch}") / "bundle", torch_weights=False)
            cache[arch] = (model, path)
        return cache[arch]

    return build


def _agreement_measured_here(reference: Path, candidate: Path, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Label agreement and largest logit gap of two bundles' graphs, both run here on the same batches."""
    import onnxruntime as ort

    logits = []
    for bundle in (reference, candidate):
        sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
        logits.append(np.concatenate([sess.run(None, batch)[0] for batch in batches]))
    ref, cand = logits
    return {"agreement": float((ref.argmax(-1) == cand.argmax(-1)).mean()), "examples": len(ref), "max_abs_diff": float(np.abs(ref - cand).max())}


def assert_agreement_with_fp32(model: PromptModel, fp32: Path, bundle: Path, texts: list[str], minimum: float) -> None:
    """The reduced-precision graph agrees with the fp32 graph on ``texts`` (measured here), and the manifest reports just that."""
    ours = _agreement_measured_here(fp32, bundle, ox.text_batches(model, texts))
    assert ours["agreement"] >= minimum and ours["max_abs_diff"] > 0  # > 0: the graph really is not the fp32 one
    report = json.loads((bundle / "manifest.json").read_text())["agreement_with_fp32"]
    assert ours["examples"] == len(texts) and (report["agreement"], report["examples"]) == (ours["agreement"], ours["examples"])
    assert report["max_abs_diff"] == pytest.approx(ours["max_abs_diff"], rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2", "gemma"])
def test_graph_matches_torch_on_the_shape_grid(exported: Any, arch: str) -> None:
    model, path = exported(arch)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["validation"]["cases"] == len(ox.BATCH_SIZES) * 4 * 2  # 3 batch sizes, 4 lengths, 2 sides
    assert manifest["validation"]["max_abs_diff"] < 1e-4
    # Independently of the exporter's own check: a fresh grid with other lengths and seeds.
    sess = ox.session(path / "model.onnx")
    for case in ox.shape_grid(model, batch_sizes=(2, 5), lengths=(6, 29, 48)):
        expected = ox.torch_label_logits(model, case.batch)
        got = sess.run(None, case.batch)[0]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0, err_msg=case.label)
        assert (got.argmax(-1) == expected.argmax(-1)).all(), case.label


@pytest.mark.parametrize("arch", ["bert", "gemma"])
def test_graph_signature_has_named_axes_and_no_vocab_projection(exported: Any, arch: str) -> None:
    model, path = exported(arch)
    graph = onnx.load(str(path / "model.onnx"))
    assert graph.opset_import[0].version == ox.OPSET or any(o.version == ox.OPSET for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    expected_inputs = {"input_ids", "attention_mask", "answer_pos"} | ({"token_type_ids"} if model.uses_token_types else set())
    assert set(dims) == expected_inputs
    assert dims["input_ids"] == ["batch_size", "sequence_length"] and dims["answer_pos"] == ["batch_size"]
    (output,) = graph.graph.output
    assert output.name == "label_logits"
    assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == ["batch_size", 2]
    # The vocabulary is only ever gathered from (input embedding), never multiplied against.
    vocab = model.lm.get_input_embeddings().num_embeddings
    init_shapes = {i.name: list(i.dims) for i in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            assert all(vocab not in init_shapes.get(name, []) for name in node.input), node.name


@pytest.mark.parametrize("arch", ["gpt2", "gemma"])
def test_decoder_graph_gives_the_same_logits_for_left_and_right_padding(exported: Any, arch: str) -> None:
    model, path = exported(arch)
    sess = ox.session(path / "model.onnx")
    encoded = model.encode(TEXTS)
    right = sess.run(None, {k: v.numpy() for k, v in model.collate(encoded, "right").items()})[0]
    left = sess.run(None, {k: v.numpy() for k, v in model.collate(encoded, "left").items()})[0]
    np.testing.assert_allclose(left, right, atol=1e-5)


def test_validation_fails_loudly_when_the_graph_disagrees(exported: Any, tiny_lm: Any) -> None:
    _, path = exported("bert")
    other = _model(tiny_lm, "bert")
    with torch.no_grad():
        other.lm.cls.predictions.transform.dense.bias.add_(0.5)
    with pytest.raises(ox.ExportValidationError, match="max abs difference"):
        ox.validate_graph(other, path / "model.onnx", batch_sizes=(1,), lengths=(5,))


def test_int8_export_runs_and_reports_agreement(exported: Any, tmp_path: Path) -> None:
    model, fp32 = exported("gemma")
    path = model.export(tmp_path / "int8", quantize="int8", int8_mode="dynamic", validation_texts=TEXTS * 3, torch_weights=False)
    assert json.loads((path / "manifest.json").read_text())["precision"] == "int8"
    assert_agreement_with_fp32(model, fp32, path, TEXTS * 3, minimum=0.9)
    graph = onnx.load(str(path / "model.onnx"))
    assert any(n.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul") for n in graph.graph.node)
    probs = Predictor.from_pretrained(path, backend="onnx").predict_proba(TEXTS)
    assert probs.shape == (len(TEXTS), 2) and np.allclose(probs.sum(-1), 1, atol=1e-5)


def test_int8_weight_only_mode_keeps_activations_in_float(exported: Any, tmp_path: Path) -> None:
    model, fp32 = exported("gpt2")
    path = model.export(tmp_path / "w8", quantize="int8", int8_mode="weight-only", validation_texts=TEXTS * 3, torch_weights=False, optimize=False)
    assert json.loads((path / "manifest.json").read_text())["quantization"]["mode"] == "weight-only"
    assert_agreement_with_fp32(model, fp32, path, TEXTS * 3, minimum=0.95)
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(str(path / "model.onnx")).graph.node)


@pytest.mark.parametrize("mode,quantized_op", [("weight-only", "MatMulNBits"), ("dynamic", "MatMulInteger")])
def test_int8_only_nodes_quantises_just_the_named_projections(exported: Any, tmp_path: Path, mode: str, quantized_op: str) -> None:
    """int8_nodes=("down_proj",): those MatMuls are int8, every other projection (and the embedding) stays fp32."""
    model, fp32 = exported("gemma")
    path = model.export(tmp_path / mode, quantize="int8", int8_mode=mode, int8_nodes=("down_proj",), validation_texts=TEXTS * 3,
                        torch_weights=False, optimize=False)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["quantization"]["only_nodes"] == ["down_proj"]
    nodes = onnx.load(str(path / "model.onnx")).graph.node
    quantized = [n.name for n in nodes if n.op_type == quantized_op]
    assert len(quantized) == model.lm.config.num_hidden_layers and all("down_proj" in n for n in quantized)
    assert any(n.op_type == "MatMul" and "q_proj" in n.name for n in nodes)
    model_proto = onnx.load(str(path / "model.onnx"))
    floats = {i.name for i in model_proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    embedding = [n for n in nodes if n.op_type == "Gather" and "embed_tokens" in n.name]
    assert embedding and all(n.input[0] in floats for n in embedding)  # the full dynamic recipe makes this table uint8
    assert_agreement_with_fp32(model, fp32, path, TEXTS * 3, minimum=0.95)
    with pytest.raises(ValueError, match="no MatMul/Gemm node"):
        model.export(tmp_path / "none", quantize="int8", int8_nodes=("no_such_projection",), torch_weights=False, optimize=False)


@pytest.mark.parametrize("arch", ["bert", "gemma"])  # gemma: its fused FastGelu must run in half precision too
def test_fp16_export_keeps_float32_io_and_agrees(exported: Any, tmp_path: Path, arch: str) -> None:
    model, fp32 = exported(arch)
    path = model.export(tmp_path / "fp16", fp16=True, validation_texts=TEXTS * 3, torch_weights=False)
    assert json.loads((path / "manifest.json").read_text())["precision"] == "fp16"
    assert_agreement_with_fp32(model, fp32, path, TEXTS * 3, minimum=0.95)
    graph = onnx.load(str(path / "model.onnx"))
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.graph.initializer)


def test_bad_export_options_are_refused(tiny_lm: Any, tmp_path: Path) -> None:
    model = _model(tiny_lm, "bert")
    with pytest.raises(ValueError, match="quantize"):
        model.export(tmp_path / "x", quantize="int4")
    with pytest.raises(ValueError, match="not both"):
        model.export(tmp_path / "x", quantize="int8", fp16=True)
    with pytest.raises(ValueError, match="format"):
        model.export(tmp_path / "x", format="tflite")
    assert not (tmp_path / "x").exists()


def test_tensorrt_export_names_what_is_missing(tiny_lm: Any, tmp_path: Path) -> None:
    from fsserve.exporters.tensorrt import tensorrt_status

    if tensorrt_status()["cuda"]:
        pytest.skip("this machine has a GPU; the gpu test covers TensorRT")
    with pytest.raises(ImportError, match="TensorRT is not available here: no CUDA GPU"):
        _model(tiny_lm, "bert").export(tmp_path / "trt", format="tensorrt")
    assert not (tmp_path / "trt").exists()


@pytest.mark.gpu
def test_tensorrt_bundle_runs_with_the_tensorrt_provider(tiny_lm: Any, tmp_path: Path) -> None:
    from fsserve.exporters.tensorrt import tensorrt_status

    if not tensorrt_status()["onnxruntime_provider"]:
        pytest.skip("onnxruntime-gpu with the TensorRT provider is not installed")
    model = _model(tiny_lm, "bert")
    path = model.export(tmp_path / "trt", format="tensorrt", torch_weights=False)
    predictor = Predictor.from_pretrained(path, backend="onnx", device="tensorrt", trt_cache_dir=tmp_path / "cache")
    expected = model.predict_logits(TEXTS).numpy()
    np.testing.assert_allclose(predictor.label_logits(TEXTS), expected, atol=1e-3)


@pytest.mark.gpu
def test_fp16_and_io_binding_on_cuda(tiny_lm: Any, tmp_path: Path) -> None:
    from fsserve.runtime.onnx import available_providers

    if "CUDAExecutionProvider" not in available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    model = _model(tiny_lm, "bert")
    path = model.export(tmp_path / "fp16", fp16=True, torch_weights=False)
    predictor = Predictor.from_pretrained(path, backend="onnx", device="cuda")
    assert predictor.backend.io_binding
    assert predictor.predict(TEXTS) == model.predict(TEXTS)


def test_cli_export_writes_bundle_and_triton_repository(tiny_lm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fsserve.cli import main

    model = _model(tiny_lm, "roberta")
    model.save_pretrained(tmp_path / "model")
    code = main(["export", str(tmp_path / "model"), str(tmp_path / "bundle"), "--quantize", "int8", "--triton-repository", str(tmp_path / "triton")])
    assert code == 0
    assert "agreement_with_fp32" in capsys.readouterr().out
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    assert (tmp_path / "triton" / "fsserve" / "config.pbtxt").is_file()
    assert (tmp_path / "triton" / "fsserve" / "1" / "model.onnx").is_file()
    assert main(["export", str(tmp_path), str(tmp_path / "other")]) == 2
    assert "not a saved fsserve model" in capsys.readouterr().err


def test_cli_export_warns_below_the_floor_and_names_only_the_flags_not_yet_given(tiny_lm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from fsserve.cli import export as cli_export
    from fsserve.cli import main

    monkeypatch.setattr(cli_export, "AGREEMENT_FLOOR", 1.01)  # any agreement is "below": the message is what is checked
    model = _model(tiny_lm, "gemma")
    model.save_pretrained(tmp_path / "model")
    calibration = tmp_path / "train.txt"
    calibration.write_text("\n".join(TEXTS * 4) + "\n", encoding="utf-8")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "plain"), "--quantize", "int8"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "--calibration-file" in err and "--int8-centred" in err
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "tuned"), "--quantize", "int8", "--calibration-file", str(calibration),
                 "--int8-centred"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "--calibration-file" not in err and "--int8-centred" not in err and "--int8-outliers" in err
    assert "--int8-keep-float" in err  # forced centring skips the automatic steps, so the flag is still worth naming
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "kept"), "--quantize", "int8", "--calibration-file", str(calibration),
                 "--int8-centred", "--int8-keep-float", "down_proj"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "--int8-keep-float" not in err
