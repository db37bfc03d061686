"""The Triton repository that takes text: configs parsed with Triton's model-config proto, the Python steps run
through a stand-in of triton_python_backend_utils, the ensemble answered like the Predictor (see triton_standin.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")

from fsserve.bundle import verify_bundle  # noqa: E402
from fsserve.config import PromptConfig  # noqa: E402
from fsserve.exporters.triton_text import export_triton_text_repository  # noqa: E402
from fsserve.modeling import PromptModel  # noqa: E402
from fsserve.predictor import Predictor  # noqa: E402
from triton_standin import Repository, backend_utils_module, parse_config  # noqa: E402

TEXTS = ["A gripping, warm film.", "Dull and far too long.", "An odd one that somehow works for most of its length, then stops.", "Great!"]
PAIRS = (["The cat sat on the mat.", "It rains.", "Nobody came."], ["A cat is sitting.", "The sun shines.", "Everyone was there."])
STEPS = ("preprocess", "onnx", "postprocess")


@pytest.fixture(scope="module")
def bundles(tiny_lm: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``sst2``: tiny BERT with a demonstration pool; ``rte``: tiny RoBERTa for sentence pairs, no pool."""
    from fsserve.data import Example
    from fsserve.demos import DemoIndex

    root = tmp_path_factory.mktemp("triton-text")
    lm, tokenizer = tiny_lm("bert")
    single = PromptModel(lm, tokenizer, PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=64)).eval()
    single.attach_demos(DemoIndex([Example("A gem of a film.", label="1"), Example("A tedious mess.", label="0")], labels=["0", "1"]))
    lm, tokenizer = tiny_lm("roberta")
    pair = PromptModel(lm, tokenizer, PromptConfig("{sent_0} ? {mask} , {sent_1}", {"entailment": "yes", "not_entailment": "no"})).eval()
    return {"sst2": single.export(root / "sst2"), "rte": pair.export(root / "rte")}


@pytest.fixture(scope="module")
def repository(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One repository holding both text ensembles."""
    root = tmp_path_factory.mktemp("repo")
    for name, bundle in bundles.items():
        export_triton_text_repository(bundle, root, model_name=name, max_batch_size=8, pad_to_multiple=8)
    return root


@pytest.fixture()
def triton(repository: Path, monkeypatch: pytest.MonkeyPatch) -> Repository:
    """The repository behind the stand-in backend utils (importable as Triton's module while the test runs)."""
    utils = backend_utils_module()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    return Repository(repository, utils)


def texts_tensor(texts: list[str]) -> np.ndarray:
    """TEXT as a client sends it to a batching Triton model: [rows, 1] of bytes."""
    return np.array([[t.encode()] for t in texts], dtype=np.object_)


def test_every_config_parses_and_the_steps_chain(repository: Path, bundles: dict[str, Path]) -> None:
    from tritonclient.grpc import model_config_pb2 as mc

    for name, bundle in bundles.items():
        ensemble = parse_config(repository / name)
        configs = {step: parse_config(repository / f"{name}_{step}") for step in STEPS}
        assert ensemble.platform == "ensemble" and (repository / name / "1").is_dir()
        assert [i.name for i in ensemble.input] == (["TEXT", "TEXT_B"] if name == "rte" else ["TEXT"])
        assert all(i.data_type == mc.TYPE_STRING and list(i.dims) == [1] for i in ensemble.input)
        label, probs = ensemble.output
        assert (label.name, label.data_type, list(label.dims)) == ("LABEL", mc.TYPE_STRING, [1])
        assert (probs.name, probs.data_type, list(probs.dims)) == ("PROBS", mc.TYPE_FP32, [2])
        assert configs["preprocess"].backend == configs["postprocess"].backend == "python"
        assert configs["onnx"].platform == "onnxruntime_onnx"
        for config in configs.values():
            assert config.max_batch_size >= ensemble.max_batch_size > 0 and config.HasField("dynamic_batching")
        # each step's maps name the composing model's own tensors, and every tensor it reads exists by then
        available = {i.name: i for i in ensemble.input}
        for step, expected in zip(ensemble.ensemble_scheduling.step, STEPS):
            config = configs[expected]
            assert step.model_name == f"{name}_{expected}" and step.model_version == -1
            assert sorted(step.input_map) == sorted(i.name for i in config.input)
            for spec in config.input:
                produced = available[step.input_map[spec.name]]
                assert (produced.data_type, list(produced.dims)) == (spec.data_type, list(spec.dims)), (expected, spec.name)
            assert sorted(step.output_map) == sorted(o.name for o in config.output)
            available.update({step.output_map[o.name]: o for o in config.output})
        assert {"LABEL", "PROBS"} <= set(available)
        graph_inputs = {i.name for i in configs["onnx"].input}
        assert {"input_ids", "attention_mask", "answer_pos"} <= graph_inputs and (name == "rte" or "token_type_ids" in graph_inputs)
        params = {k: v.string_value for k, v in configs["postprocess"].parameters.items()}
        assert json.loads(params["labels"]) == json.loads((bundle / "fsserve.json").read_text())["labels"] and params["probabilities"] == "softmax"
        copy = repository / f"{name}_preprocess" / "1" / "bundle"
        assert verify_bundle(copy)["files"] == verify_bundle(bundle)["files"]
        assert (repository / f"{name}_onnx" / "1" / "model.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()
        assert "TritonPythonModel" in (repository / f"{name}_postprocess" / "1" / "model.py").read_text()


def test_text_in_label_and_probs_out_as_the_predictor(triton: Repository, bundles: dict[str, Path]) -> None:
    predictor = Predictor.from_pretrained(bundles["sst2"], backend="onnx")
    requests = [{"TEXT": texts_tensor(TEXTS[:1])}, {"TEXT": texts_tensor(TEXTS[1:])}, {"TEXT": texts_tensor(TEXTS[::-1])}]
    answers = triton.run_ensemble("sst2", requests)
    for request, answer in zip(requests, answers):
        assert isinstance(answer, dict), answer
        texts = [t.decode() for t in request["TEXT"].reshape(-1)]
        expected = predictor.predict_proba(texts)
        np.testing.assert_allclose(answer["PROBS"], expected, atol=1e-5)
        assert [x.decode() for x in answer["LABEL"].reshape(-1)] == [predictor.labels[i] for i in expected.argmax(-1)]


def test_sentence_pairs_and_padding_to_a_multiple(triton: Repository, bundles: dict[str, Path]) -> None:
    predictor = Predictor.from_pretrained(bundles["rte"], backend="onnx")
    request = {"TEXT": texts_tensor(PAIRS[0]), "TEXT_B": texts_tensor(PAIRS[1])}
    (tensors,) = triton.run_python("rte_preprocess", [request])
    assert isinstance(tensors, dict) and tensors["input_ids"].shape[1] % 8 == 0 and tensors["answer_pos"].shape == (3, 1)
    (answer,) = triton.run_ensemble("rte", [request])
    assert isinstance(answer, dict)
    np.testing.assert_allclose(answer["PROBS"], predictor.predict_proba(*PAIRS), atol=1e-5)
    with pytest.raises(AssertionError, match="different batch sizes"):  # Triton refuses inputs whose batch sizes differ
        triton.run_ensemble("rte", [{"TEXT": texts_tensor(PAIRS[0]), "TEXT_B": texts_tensor(PAIRS[1][:2])}])


def test_bad_texts_fail_only_their_own_request_with_fsserve_serves_message(triton: Repository) -> None:
    requests = [{"TEXT": texts_tensor(["   "])}, {"TEXT": texts_tensor(TEXTS[:2])}, {"TEXT": np.array([[b"ok"], [b"\xff\xfe"]], dtype=np.object_)},
                {"TEXT": texts_tensor(["x" * 9000])}]
    empty, good, undecodable, too_long = triton.run_ensemble("sst2", requests)
    assert empty == "TEXT[0] is empty (or only whitespace)"
    assert undecodable == "TEXT[1] is not valid UTF-8 (byte 0)"
    assert too_long == "TEXT[0] is 9000 bytes; the limit is 8192"
    assert isinstance(good, dict) and good["PROBS"].shape == (2, 2)


def test_a_request_built_by_tritonclient_round_trips(triton: Repository, bundles: dict[str, Path]) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

    sent = grpcclient.InferInput("TEXT", [len(TEXTS), 1], "BYTES")
    sent.set_data_from_numpy(texts_tensor(TEXTS))
    tensor = sent._get_tensor()
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("TEXT", "BYTES", [len(TEXTS), 1])
    received = deserialize_bytes_tensor(sent._get_content()).reshape(list(tensor.shape))
    (answer,) = triton.run_ensemble("sst2", [{"TEXT": received}])
    assert isinstance(answer, dict)
    response = service_pb2.ModelInferResponse(model_name="sst2", model_version="1")
    response.outputs.add(name="LABEL", datatype="BYTES", shape=list(answer["LABEL"].shape))
    response.outputs.add(name="PROBS", datatype="FP32", shape=list(answer["PROBS"].shape))
    response.raw_output_contents.extend([serialize_byte_tensor(answer["LABEL"]).item(), answer["PROBS"].astype("<f4").tobytes()])
    result = grpcclient.InferResult(response)
    expected = Predictor.from_pretrained(bundles["sst2"], backend="onnx").predict_proba(TEXTS)
    np.testing.assert_allclose(result.as_numpy("PROBS"), expected, atol=1e-5)
    assert result.as_numpy("LABEL").shape == (len(TEXTS), 1)


def test_the_steps_run_without_torch(repository: Path, bundles: dict[str, Path]) -> None:
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["torch"] = None  # as in a Python environment without torch: importing it fails
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import numpy as np
        import triton_standin
        utils = triton_standin.backend_utils_module()
        sys.modules["triton_python_backend_utils"] = utils
        repo = triton_standin.Repository(__import__("pathlib").Path({str(repository)!r}), utils)
        texts = {PAIRS!r}
        request = {{"TEXT": np.array([[t.encode()] for t in texts[0]], dtype=object), "TEXT_B": np.array([[t.encode()] for t in texts[1]], dtype=object)}}
        (answer,) = repo.run_ensemble("rte", [request])
        (single,) = repo.run_ensemble("sst2", [{{"TEXT": np.array([[t.encode()] for t in {TEXTS!r}], dtype=object)}}])  # with demonstrations
        heavy = [m for m in ("transformers", "sentence_transformers") if m in sys.modules]
        print(json.dumps({{"heavy": heavy, "probs": answer["PROBS"].tolist(), "single": single["PROBS"].tolist()}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    np.testing.assert_allclose(report["probs"], Predictor.from_pretrained(bundles["rte"], backend="onnx").predict_proba(*PAIRS), atol=1e-5)
    np.testing.assert_allclose(report["single"], Predictor.from_pretrained(bundles["sst2"], backend="onnx").predict_proba(TEXTS), atol=1e-5)


def test_cli_export_writes_the_text_repository(tiny_lm: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fsserve.cli import main

    lm, tokenizer = tiny_lm("bert")
    PromptModel(lm, tokenizer, PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"})).save_pretrained(tmp_path / "model")
    code = main(["export", str(tmp_path / "model"), str(tmp_path / "bundle"), "--triton-repository", str(tmp_path / "triton"),
                 "--triton-model-name", "sst2", "--triton-text"])
    assert code == 0 and "wrote Triton model repository" in capsys.readouterr().out
    assert parse_config(tmp_path / "triton" / "sst2").platform == "ensemble"
    assert sorted(p.name for p in (tmp_path / "triton").iterdir()) == ["sst2", "sst2_onnx", "sst2_postprocess", "sst2_preprocess"]


def test_bounded_load_through_the_ensemble_every_answer_matched(triton: Repository, bundles: dict[str, Path]) -> None:
    from test_serving_load import request_rows

    predictor = Predictor.from_pretrained(bundles["sst2"], backend="onnx")
    requests = [{"TEXT": texts_tensor(request_rows(i))} for i in range(96)]
    answers: list[Any] = []
    for start in range(0, len(requests), 8):  # what Triton's dynamic batcher hands each step: up to 8 requests at once
        answers += triton.run_ensemble("sst2", requests[start : start + 8])
    assert all(isinstance(a, dict) for a in answers), [a for a in answers if not isinstance(a, dict)][:3]
    rows = [request_rows(i) for i in range(96)]
    expected = predictor.predict_proba([t for r in rows for t in r])
    got = np.concatenate([a["PROBS"] for a in answers])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [x.decode() for a in answers for x in a["LABEL"].reshape(-1)] == [predictor.labels[i] for i in expected.argmax(-1)]
