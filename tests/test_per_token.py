"""Per-token int8 (fsserve.exporters.per_token): GPTQ weights, a scale per token, outlier channels in float."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from fsserve.config import PromptConfig
from fsserve.exporters import onnx as ox
from fsserve.exporters import per_token as pt
from fsserve.exporters.bundle import split_calibration
from fsserve.modeling import PromptModel
from fsserve.predictor import Predictor

TEXTS = ["A fine film.", "Dull, slow and far too long for what it has to say about anything at all.", "Great!", "It was not good",
         "Nothing in it works.", "A small, warm and funny story.", "I left early.", "Two hours I will never get back."]
PROMPT = PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=48)
OUTLIERS = 4  # the tiny model's hidden size is 32


@pytest.fixture(scope="module")
def gemma(tiny_lm: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[PromptModel, Path]:
    """A tiny Gemma prompt model and its fp32 label-logits graph."""
    lm, tokenizer = tiny_lm("gemma")
    model = PromptModel(lm, tokenizer, PROMPT).eval()
    path = tmp_path_factory.mktemp("per-token") / "fp32.onnx"
    ox.export_graph(model, path)
    return model, path


def _run(path: Path, batch: dict[str, np.ndarray]) -> np.ndarray:
    """The graph's label logits on one batch."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, batch)[0]


def test_gptq_rounds_with_less_output_error_than_round_to_nearest() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 8)) @ rng.standard_normal((8, 96))  # correlated input channels, as in a real layer
    x[:, 7] = 0.0  # a channel the calibration never saw: its row must not break the factorisation
    w = rng.standard_normal((96, 48)).astype(np.float32)
    q, scale = pt.gptq_int8(w, x.T @ x)
    assert q.dtype == np.int8 and q.shape == w.shape and np.abs(q.astype(int)).max() <= 127
    np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    rtn = pt.round_int8(w, scale)
    err_gptq = np.linalg.norm(x @ (w - q * scale))
    err_rtn = np.linalg.norm(x @ (w - rtn * scale))
    assert err_gptq < 0.7 * err_rtn


@pytest.mark.parametrize("centred", [False, True])
def test_every_weight_matmul_becomes_integer_and_the_answers_stay(gemma: tuple[PromptModel, Path], tmp_path: Path, centred: bool) -> None:
    model, fp32 = gemma
    target = tmp_path / "int8.onnx"
    record = pt.quantize_per_token(fp32, target, ox.text_batches(model, TEXTS, 4), outliers=OUTLIERS, centred=centred)
    weights = pt.weight_matmuls(onnx.load(str(fp32)))
    assert record["matmuls"] == sum(len(v) for v in weights.values()) > 0 and record["points"] == len(weights)
    assert record["gptq"] and record["outliers"] == OUTLIERS and record["calibration_tokens"] > 0
    graph = onnx.load(str(target))
    assert not pt.weight_matmuls(graph)  # no float weight MatMul is left (outlier MatMuls have OUTLIERS < MIN_DIM rows)
    ops = [n.op_type for n in graph.graph.node]
    # one quantisation per input, shared by q/k/v (and gate/up); one integer product per MatMul
    assert ops.count("QuantizeLinear") == record["points"] < ops.count("MatMulIntegerToFloat") == record["matmuls"]
    for batch in ox.text_batches(model, TEXTS * 2, 5):
        ref, got = _run(fp32, batch), _run(target, batch)
        assert np.abs(got - ref).max() <= 0.05 * max(1.0, float(np.abs(ref).max()))
        assert np.abs(got - ref).max() > 0  # really quantised


@pytest.mark.parametrize("centred", [False, True])
def test_a_row_keeps_its_answer_whatever_shares_its_batch(gemma: tuple[PromptModel, Path], tmp_path: Path, centred: bool) -> None:
    """Per-token scales: a sentence's logits do not depend on the other rows (dynamic int8's batch-wide scale does)."""
    model, fp32 = gemma
    per_token, dynamic = tmp_path / "pt.onnx", tmp_path / "dyn.onnx"
    pt.quantize_per_token(fp32, per_token, ox.text_batches(model, TEXTS, 4), outliers=OUTLIERS, centred=centred)
    ox.quantize_int8(fp32, dynamic, "dynamic")
    short, long = TEXTS[2], TEXTS[1]
    alone = model.collate(model.encode([short]))
    together = model.collate(model.encode([short, long]))
    feeds = [{k: v.numpy() for k, v in b.items()} for b in (alone, together)]
    np.testing.assert_allclose(_run(per_token, feeds[0])[0], _run(per_token, feeds[1])[0], atol=1e-5)
    assert np.abs(_run(dynamic, feeds[0])[0] - _run(dynamic, feeds[1])[0]).max() > 1e-4


def test_keep_float_leaves_the_named_matmuls_and_their_input_siblings_in_float(gemma: tuple[PromptModel, Path], tmp_path: Path) -> None:
    model, fp32 = gemma
    target = tmp_path / "int8.onnx"
    batches = ox.text_batches(model, TEXTS, 4)
    everything = pt.quantize_per_token(fp32, tmp_path / "all.onnx", batches, outliers=OUTLIERS)
    record = pt.quantize_per_token(fp32, target, batches, outliers=OUTLIERS, keep_float=("down_proj", "layers.1/self_attn/k_proj"))
    left = pt.weight_matmuls(onnx.load(str(target)))
    names = sorted(node.name for nodes in left.values() for node in nodes)
    # both layers' down_proj, and layer 1's k_proj with the q_proj and v_proj that read the same input
    assert sum("down_proj" in n for n in names) == 2 and sum("layers.1/self_attn" in n for n in names) == 3 and len(names) == 5
    assert record["kept_float"] == 5 and record["matmuls"] == everything["matmuls"] - 5
    ops = [n.op_type for n in onnx.load(str(target)).graph.node]
    assert ops.count("MatMulIntegerToFloat") == record["matmuls"]
    batch = ox.text_batches(model, TEXTS, 8)[0]
    assert np.abs(_run(target, batch) - _run(fp32, batch)).max() > 0  # the rest is still quantised
    nothing = pt.quantize_per_token(fp32, tmp_path / "none.onnx", batches, outliers=OUTLIERS, keep_float=("/",))
    assert nothing["matmuls"] == 0 and nothing["kept_float"] == everything["matmuls"]
    np.testing.assert_allclose(_run(tmp_path / "none.onnx", batch), _run(fp32, batch), atol=1e-6)


def test_outlier_channels_are_the_calibrated_largest_and_leave_the_integer_path(gemma: tuple[PromptModel, Path], tmp_path: Path) -> None:
    model, fp32 = gemma
    batches = ox.text_batches(model, TEXTS, 4)
    target = tmp_path / "int8.onnx"
    pt.quantize_per_token(fp32, target, batches, outliers=OUTLIERS)
    points = list(pt.weight_matmuls(onnx.load(str(fp32))))
    stats = pt.calibrate(fp32, batches, points, hessians=False)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(target)).graph.initializer}
    for index, name in enumerate(points):
        chosen = inits[f"pertoken/p{index}/outliers"]
        assert sorted(chosen) == sorted(np.argsort(stats[name]["amax"])[-OUTLIERS:])
        mask = inits[f"pertoken/p{index}/mask"]
        assert (mask[chosen] == 0).all() and mask.sum() == len(mask) - OUTLIERS
    for node in onnx.load(str(target)).graph.node:
        if node.op_type == "MatMulIntegerToFloat":  # the outlier rows of its int8 weight are zero: they are added in float
            point = node.input[0].rsplit("/", 1)[0]
            assert (inits[node.input[1]][inits[point + "/outliers"]] == 0).all()


def test_without_calibration_texts_it_rounds_to_nearest_and_says_so(gemma: tuple[PromptModel, Path], tmp_path: Path) -> None:
    model, fp32 = gemma
    record = pt.quantize_per_token(fp32, tmp_path / "rtn.onnx", None)
    assert not record["gptq"] and record["outliers"] == 0 and "no calibration" in record["note"]
    assert not any(n.op_type == "Gather" and n.name.endswith("/Outliers") for n in onnx.load(str(tmp_path / "rtn.onnx")).graph.node)
    centred = pt.quantize_per_token(fp32, tmp_path / "rtn-c.onnx", None, centred=True)  # the centre alone on the float side
    assert centred["centred"] and not centred["gptq"]
    for batch in ox.text_batches(model, TEXTS, 4):
        ref = _run(fp32, batch)
        for path in (tmp_path / "rtn.onnx", tmp_path / "rtn-c.onnx"):
            assert 0 < np.abs(_run(path, batch) - ref).max() <= 0.05 * max(1.0, float(np.abs(ref).max()))
    with pytest.raises(ValueError, match="outliers"):
        pt.quantize_per_token(fp32, tmp_path / "x.onnx", None, outliers=-1)


def test_calibration_split_is_seeded_disjoint_and_holds_out_a_quarter() -> None:
    texts = [f"t{i}" for i in range(40)]
    calibrate, held = split_calibration(texts)
    assert len(held) == 10 and len(calibrate) == 30 and not set(held) & set(calibrate)
    assert (calibrate, held) == split_calibration(texts) and held != texts[:10]
    assert split_calibration(texts[:3]) == (split_calibration(texts[:3])[0], [])


def test_bundle_records_the_recipe_and_agreement_on_held_out_calibration_texts(gemma: tuple[PromptModel, Path], tmp_path: Path) -> None:
    model, _ = gemma
    path = model.export(tmp_path / "b", quantize="int8", int8_mode="per-token", calibration_texts=TEXTS * 4, int8_outliers=OUTLIERS)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["quantization"]["mode"] == "per-token" and manifest["quantization"]["calibration_texts"] == 24
    assert manifest["agreement_with_fp32"]["on"] == "8 held-out calibration texts"
    assert manifest["weights"]["embedding"]["bits"] == 8
    probs = Predictor.from_pretrained(path, backend="onnx").predict_proba(TEXTS)
    assert probs.shape == (len(TEXTS), 2) and np.allclose(probs.sum(-1), 1, atol=1e-5)


def test_cli_export_takes_a_calibration_file(gemma: tuple[PromptModel, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fsserve.cli import main

    model, _ = gemma
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "train.txt").write_text("\n".join(TEXTS * 2), encoding="utf-8")
    code = main(["export", str(tmp_path / "model"), str(tmp_path / "bundle"), "--quantize", "int8",
                 "--calibration-file", str(tmp_path / "train.txt"), "--int8-outliers", str(OUTLIERS)])
    assert code == 0
    quantization = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["quantization"]
    assert quantization["mode"] == "per-token" and quantization["outliers"] == OUTLIERS and quantization["gptq"]
    assert '"per-token"' in capsys.readouterr().out


def test_bench_uses_a_per_token_bundles_own_graph_and_refuses_to_make_one(gemma: tuple[PromptModel, Path], tmp_path: Path) -> None:
    from fsserve.bench.backends import Subject, ensure_graphs

    model, fp32 = gemma
    quantization = {"mode": "per-token", "outliers": OUTLIERS}
    bundled = Subject(model, "b", 1.0, {"int8": tmp_path / "int8.onnx", "fp32": fp32}, {"bundle": {"quantization": quantization}, "cache": str(tmp_path)})
    assert ensure_graphs(bundled, True, "per-token")["int8"] == tmp_path / "int8.onnx"
    assert bundled.notes["int8_recipe"] == quantization
    bare = Subject(model, "m", 1.0, {"fp32": fp32}, {"cache": str(tmp_path)})
    with pytest.raises(ValueError, match="--calibration-file"):
        ensure_graphs(bare, True, "per-token")


def test_onnxruntime_quantiser_options_pick_dynamic_under_auto_and_are_refused_by_per_token(gemma: tuple[PromptModel, Path], tmp_path: Path) -> None:
    model, _ = gemma
    path = model.export(tmp_path / "auto", quantize="int8", int8_nodes=("down_proj",), optimize=False)
    assert json.loads((path / "manifest.json").read_text())["quantization"]["mode"] == "dynamic"
    with pytest.raises(ValueError, match="per-token quantises every weight MatMul"):
        model.export(tmp_path / "pt", quantize="int8", int8_mode="per-token", per_channel=True)


@pytest.mark.parametrize("centred", [False, True])
def test_an_all_zero_row_gives_exactly_zero_and_other_rows_stay_close(tmp_path: Path, centred: bool) -> None:
    """A row of zeros has range 0: its quantised values mean nothing, but its product must still be exactly 0 (no NaN)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "zero"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 64])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 48])],
        [numpy_helper.from_array(np.zeros(1, np.float32), "zero"), numpy_helper.from_array(w, "w")])
    source, target = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    calibration = [{"x": rng.standard_normal((4, 8, 64)).astype(np.float32)} for _ in range(2)]
    pt.quantize_per_token(source, target, calibration, outliers=OUTLIERS, centred=centred)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    x[1, 2] = 0.0
    got = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.isfinite(got).all() and (got[1, 2] == 0).all()
    np.testing.assert_allclose(got, x @ w, atol=0.05 * np.abs(x @ w).max())


@pytest.mark.parametrize(("centred_better", "ffn_better"), [(True, False), (False, True)])
def test_auto_centring_builds_the_centred_graph_only_below_the_floor_and_keeps_the_more_faithful(
        gemma: tuple[PromptModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, centred_better: bool, ffn_better: bool) -> None:
    from fsserve.exporters import bundle

    model, _ = gemma
    real_agreement, calls = ox.agreement, {"calibrate": 0}
    real_calibrate = pt.calibrate

    def agreement(reference: Any, candidate: Any, batches: Any) -> dict[str, Any]:  # the decision under test, on real graphs
        out = real_agreement(reference, candidate, batches)
        if Path(candidate).name in ("int8.onnx", "int8-centred.onnx"):
            out["agreement"] = 0.95 if (Path(candidate).name == "int8-centred.onnx") == centred_better else 0.9
        elif Path(candidate).name == "int8-float-ffn.onnx":  # the third step: down projections in float
            out["agreement"] = 0.97 if ffn_better else 0.5
        return out

    def calibrate(*args: Any, **kwargs: Any) -> Any:
        calls["calibrate"] += 1
        return real_calibrate(*args, **kwargs)

    monkeypatch.setattr(bundle.ox, "agreement", agreement)
    monkeypatch.setattr(pt, "calibrate", calibrate)
    path = model.export(tmp_path / "auto", quantize="int8", int8_mode="per-token", calibration_texts=TEXTS * 4, int8_outliers=OUTLIERS)
    record = json.loads((path / "manifest.json").read_text())["quantization"]
    choice = record["centred_choice"]
    assert choice["on"] == "8 held-out calibration texts" and choice["symmetric"] < choice["floor"] and "centred" in choice
    assert record["centred"] is centred_better and calls["calibrate"] == 1  # every variant reuses the calibration
    assert "ffn_out_in_float" in choice and (record["kept_float"] == 2) is ffn_better  # the tiny model's two down_proj
    graph = onnx.load(str(path / "model.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert ("ReduceMin" in ops) is centred_better
    assert sorted(n.name for nodes in pt.weight_matmuls(graph).values() for n in nodes) == (
        ["/model/model/layers.0/mlp/down_proj/MatMul", "/model/model/layers.1/mlp/down_proj/MatMul"] if ffn_better else [])
    # an explicit keep_float replaces the third step
    explicit = model.export(tmp_path / "explicit", quantize="int8", int8_mode="per-token", calibration_texts=TEXTS * 4,
                            int8_outliers=OUTLIERS, int8_keep_float=())
    record = json.loads((explicit / "manifest.json").read_text())["quantization"]
    assert "ffn_out_in_float" not in record["centred_choice"] and record["kept_float"] == 0
    # above the floor the symmetric graph is kept without building the other; an explicit choice is never second-guessed
    monkeypatch.setattr(bundle, "CENTRED_FLOOR", 0.0)
    kept = model.export(tmp_path / "sym", quantize="int8", int8_mode="per-token", calibration_texts=TEXTS * 4, int8_outliers=OUTLIERS)
    record = json.loads((kept / "manifest.json").read_text())["quantization"]
    assert not record["centred"] and "centred" not in record["centred_choice"] and "ffn_out_in_float" not in record["centred_choice"]
    forced = model.export(tmp_path / "forced", quantize="int8", int8_mode="per-token", calibration_texts=TEXTS * 4, int8_outliers=OUTLIERS,
                          int8_centred=True)
    record = json.loads((forced / "manifest.json").read_text())["quantization"]
    assert record["centred"] and "centred_choice" not in record


def test_keep_float_options_parse_and_belong_to_per_token(gemma: tuple[PromptModel, Path], tmp_path: Path) -> None:
    import argparse

    from fsserve.cli.export import _name_parts

    assert _name_parts("down_proj,o_proj") == ("down_proj", "o_proj") and _name_parts("none") == ()
    with pytest.raises(argparse.ArgumentTypeError, match="node-name parts"):
        _name_parts(",")
    model, _ = gemma
    with pytest.raises(ValueError, match="int8_keep_float belongs to int8_mode 'per-token', not 'dynamic'"):
        model.export(tmp_path / "x", quantize="int8", int8_mode="dynamic", int8_keep_float=("down_proj",))
    assert not (tmp_path / "x").exists()
