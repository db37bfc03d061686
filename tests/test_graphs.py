"""The CUDA-graph backend: buckets, padding, splitting and refusals on the CPU twin; graphs against eager on a GPU.

The CPU twin runs exactly the bucket code every GPU call goes through (pad up to the bucket, split
what is larger, cut the padding off), with an eager forward instead of a graph replay, and is
compared with the plain eager backend. The ``gpu`` tests compare the captured graphs themselves.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from fsserve.config import PromptConfig
from fsserve.modeling import PromptModel
from fsserve.predictor import Predictor, pad_batch, torch_backend
from fsserve.runtime.buckets import BucketPlan, pad_to_shape
from fsserve.runtime.graphs import GraphBackend
from fsserve.runtime.torch import TorchBackend

PROMPT = PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=48)
WORDS = ("warm", "dull", "a", "film", "the", "plot", "never", "lands", "funny", "and", "long", "scene", "earns", "it")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _texts(n: int, seed: int) -> list[str]:
    """``n`` sentences of varied length, so batches are ragged."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))) + "." for _ in range(n)]


def _batch(model: PromptModel, texts: list[str]) -> dict[str, np.ndarray]:
    """A right-padded batch as the Predictor builds it."""
    return pad_batch(model.encode(texts), model.pad_token_id, model.uses_token_types)


def _pair(tiny_lm: Any, arch: str) -> tuple[PromptModel, PromptModel]:
    """Two identical fp32 prompt models of one family (one per backend, as backends own their model)."""
    lm, tokenizer = tiny_lm(arch)
    return PromptModel(lm, tokenizer, PROMPT).eval(), PromptModel(copy.deepcopy(lm), tokenizer, PROMPT).eval()


# -- the bucket plan --------------------------------------------------------------------------
def test_the_plan_picks_the_smallest_bucket_that_fits() -> None:
    plan = BucketPlan(batch=(4, 1, 2, 2, 8), seq=(64, 32))
    assert plan.batch == (1, 2, 4, 8) and plan.seq == (32, 64)
    assert [plan.shape(n, 10) for n in (1, 2, 3, 5, 8)] == [(1, 32), (2, 32), (4, 32), (8, 32), (8, 32)]
    assert plan.shape(1, 32) == (1, 32) and plan.shape(1, 33) == (1, 64)
    with pytest.raises(ValueError, match="65 tokens is longer than the largest sequence bucket \\(64\\)"):
        plan.seq_bucket(65)
    with pytest.raises(ValueError, match="split"):
        plan.batch_bucket(9)
    assert [(c.start, c.stop) for c in plan.chunks(19)] == [(0, 8), (8, 16), (16, 19)] and list(plan.chunks(0)) == []
    assert plan.shapes[:2] == [(1, 32), (2, 32)] and len(plan.shapes) == 8


def test_the_plan_covers_the_prompts_max_length_and_refuses_bad_buckets() -> None:
    plan = BucketPlan(batch=(1,), seq=(32, 64))
    assert plan.covering(64) is plan
    assert plan.covering(200).seq == (32, 64, 224)  # rounded up to a multiple of 32
    for bad in ((), (0, 8), ("x",)):
        with pytest.raises(ValueError, match="buckets"):
            BucketPlan(batch=bad)


def test_batch_buckets_stop_at_what_a_call_can_carry() -> None:
    from fsserve.runtime.buckets import batch_buckets_up_to

    assert batch_buckets_up_to(32) == (1, 2, 4, 8, 16, 32)  # no 64-row graph for a Predictor of batch_size 32
    assert batch_buckets_up_to(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_buckets_up_to(1) == (1,)
    assert batch_buckets_up_to(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    with pytest.raises(ValueError, match="max_rows must be at least 1"):
        batch_buckets_up_to(0)


def test_the_batcher_takes_what_fills_a_bucket() -> None:
    plan = BucketPlan(batch=(1, 2, 4, 8, 16, 32))
    assert [plan.fitting_batch(n) for n in (1, 3, 9, 31, 40)] == [1, 2, 8, 16, 32]
    assert plan.fitting_batch(40, limit=12) == 8 and plan.fitting_batch(5, limit=64) == 4
    assert BucketPlan(batch=(4, 8)).fitting_batch(3) == 3  # fewer than the smallest bucket: all of them


def test_padding_to_a_bucket_keeps_the_rows_and_masks_the_rest() -> None:
    batch = {"input_ids": np.array([[5, 6, 7], [8, 9, 0]]), "attention_mask": np.array([[1, 1, 1], [1, 1, 0]]),
             "answer_pos": np.array([2, 1]), "token_type_ids": np.array([[0, 0, 1], [0, 1, 0]])}
    out = pad_to_shape(batch, 4, 5, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 0, 0, 0], [0] * 5, [0] * 5]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert out["answer_pos"].tolist() == [2, 1, 0, 0] and out["token_type_ids"][:2, :3].tolist() == batch["token_type_ids"].tolist()
    assert all(v.dtype == np.int64 for v in out.values())
    with pytest.raises(ValueError, match="does not fit"):
        pad_to_shape(batch, 1, 5, 0)


# -- the CPU twin against the eager backend ---------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "gemma"])
def test_bucketed_calls_equal_eager_calls(tiny_lm: Any, arch: str) -> None:
    """Every shape class: exact bucket, padded up, split across chunks, one row, longer than a small bucket."""
    graph_model, eager_model = _pair(tiny_lm, arch)
    backend = GraphBackend(graph_model, device="cpu", batch_buckets=(1, 2, 4), seq_buckets=(8, 16))
    eager = TorchBackend(eager_model, device="cpu")
    assert not backend.capture and backend.dtype == torch.float32 and backend.plan.seq == (8, 16, 64)  # covers max_length 48
    for rows, seed in ((4, 0), (3, 1), (11, 2), (1, 3)):
        batch = _batch(eager_model, _texts(rows, seed))
        got = backend.label_logits(**batch)
        assert got.shape == (rows, 2) and got.dtype == np.float32
        np.testing.assert_allclose(got, eager.label_logits(**batch), atol=1e-5, rtol=1e-5)


def test_a_sequence_longer_than_every_bucket_is_refused(tiny_lm: Any) -> None:
    model, _ = _pair(tiny_lm, "bert")
    backend = GraphBackend(model, device="cpu", seq_buckets=(16,))
    width = backend.plan.seq[-1] + 1
    batch = {"input_ids": np.ones((1, width), dtype=np.int64), "attention_mask": np.ones((1, width), dtype=np.int64),
             "answer_pos": np.array([3])}
    with pytest.raises(ValueError, match=f"{width} tokens is longer than the largest sequence bucket"):
        backend.label_logits(**batch)
    with pytest.raises(ValueError, match="answer_pos"):
        backend.label_logits(batch["input_ids"][:, :8], batch["attention_mask"][:, :8], np.array([8]))


def test_the_predictor_on_the_twin_predicts_what_the_eager_one_does(tiny_lm: Any) -> None:
    graph_model, eager_model = _pair(tiny_lm, "gemma")
    texts = _texts(37, 7)
    twin = Predictor(GraphBackend(graph_model, device="cpu", batch_buckets=(1, 8)), graph_model.encode, graph_model.labels,
                     graph_model.pad_token_id, batch_size=32)
    eager = Predictor.from_model(eager_model, device="cpu")
    np.testing.assert_allclose(twin.predict_proba(texts), eager.predict_proba(texts), atol=1e-5)


def test_two_threads_get_their_own_answers(tiny_lm: Any) -> None:
    """The static buffers are shared, so calls are serialised: each thread must get its own rows back."""
    model, eager_model = _pair(tiny_lm, "bert")
    backend = GraphBackend(model, device="cpu", batch_buckets=(4,), seq_buckets=(64,))  # one bucket: both threads share its buffers
    forward = backend.forward

    def slow_forward(**inputs: torch.Tensor) -> torch.Tensor:
        time.sleep(0.002)  # hand the other thread the GIL between copy-in and run, as a GPU replay would
        return forward(**inputs)

    backend.forward = slow_forward
    batches = [_batch(eager_model, _texts(3, seed)) for seed in (10, 11)]
    expected = [TorchBackend(eager_model, device="cpu").label_logits(**b) for b in batches]
    results: dict[int, list[np.ndarray]] = {0: [], 1: []}

    def work(i: int) -> None:
        for _ in range(15):
            results[i].append(backend.label_logits(**batches[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        assert len(results[i]) == 15
        for got in results[i]:
            np.testing.assert_allclose(got, expected[i], atol=1e-5)


def test_choosing_the_torch_backend(tiny_lm: Any) -> None:
    model, _ = _pair(tiny_lm, "bert")
    assert isinstance(torch_backend(model, "cpu"), TorchBackend)
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        torch_backend(model, "cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="seq_buckets only apply to the CUDA-graph backend"):
        torch_backend(model, "cpu", seq_buckets=(32,))
    with pytest.raises(ValueError, match="compile must be one of"):
        GraphBackend(model, device="cpu", compile="fastest")
    with pytest.raises(ValueError, match="unknown dtype"):
        GraphBackend(model, device="cpu", dtype="int8")
    assert GraphBackend(model, device="cpu", dtype="bf16").dtype == torch.bfloat16


# -- on a GPU: the captured graphs themselves -------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch", ["bert", "gpt2", "gemma"])
def test_every_captured_bucket_equals_eager_fp32(tiny_lm: Any, arch: str) -> None:
    graph_model, eager_model = _pair(tiny_lm, arch)
    backend = GraphBackend(graph_model, device="cuda", dtype="float32", batch_buckets=(1, 2, 8), seq_buckets=(16, 32, 64), warmup=True)
    eager = TorchBackend(eager_model, device="cuda")
    assert sorted(backend.graphs) == sorted(backend.plan.shapes)
    for rows in (1, 2, 5, 8, 19):
        batch = _batch(eager_model, _texts(rows, rows))
        np.testing.assert_allclose(backend.label_logits(**batch), eager.label_logits(**batch), atol=1e-4, rtol=1e-4)


def _compiled_bucket_matches_eager(tiny_lm: Any, arch: str, device: str) -> None:
    """torch.compile'd forward in one bucket (captured on CUDA, run eagerly on the CPU twin) against eager fp32."""
    graph_model, eager_model = _pair(tiny_lm, arch)
    backend = GraphBackend(graph_model, device=device, dtype="float32", batch_buckets=(4,), seq_buckets=(64,), compile="default")
    eager = TorchBackend(eager_model, device=device)
    for rows in (1, 4, 3):
        batch = _batch(eager_model, _texts(rows, 40 + rows))
        np.testing.assert_allclose(backend.label_logits(**batch), eager.label_logits(**batch), atol=1e-4, rtol=1e-4)


def test_a_compiled_forward_in_a_bucket_equals_eager_fp32_on_the_cpu(tiny_lm: Any) -> None:
    _compiled_bucket_matches_eager(tiny_lm, "gpt2", "cpu")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch", ["bert", "gemma"])
def test_a_compiled_forward_in_a_captured_graph_equals_eager_fp32(tiny_lm: Any, arch: str) -> None:
    _compiled_bucket_matches_eager(tiny_lm, arch, "cuda")


@pytest.mark.gpu
@needs_cuda
def test_a_replay_with_new_contents_is_never_stale(tiny_lm: Any) -> None:
    graph_model, eager_model = _pair(tiny_lm, "gemma")
    backend = GraphBackend(graph_model, device="cuda", dtype="float32", batch_buckets=(4,), seq_buckets=(64,))
    eager = TorchBackend(eager_model, device="cuda")
    for seed in range(6):  # the same bucket every time, different sentences
        batch = _batch(eager_model, _texts(4, 100 + seed))
        np.testing.assert_allclose(backend.label_logits(**batch), eager.label_logits(**batch), atol=1e-4, rtol=1e-4)
    assert list(backend.graphs) == [(4, 64)]


@pytest.mark.gpu
@needs_cuda
def test_two_threads_share_one_cuda_predictor(tiny_lm: Any) -> None:
    graph_model, eager_model = _pair(tiny_lm, "bert")
    predictor = Predictor.from_model(graph_model, device="cuda", dtype="float32")
    assert isinstance(predictor.backend, GraphBackend)
    texts = [_texts(5, 200), _texts(7, 201)]
    expected = [Predictor.from_model(eager_model, device="cpu").predict_proba(t) for t in texts]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                np.testing.assert_allclose(predictor.predict_proba(texts[i]), expected[i], atol=1e-4)
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.gpu
@needs_cuda
def test_bf16_graphs_agree_with_fp32_eager_labels(tiny_lm: Any) -> None:
    graph_model, eager_model = _pair(tiny_lm, "gemma")
    backend = GraphBackend(graph_model, device="cuda")  # the default: bfloat16
    assert backend.dtype == torch.bfloat16
    batch = _batch(eager_model, _texts(32, 300))
    fp32 = TorchBackend(eager_model, device="cuda").label_logits(**batch)
    np.testing.assert_allclose(backend.label_logits(**batch), fp32, atol=3e-2, rtol=5e-2)


def test_torch_only_options_are_refused_for_onnx(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from fsserve.cli import main
    from fsserve.predictor import onnx_options, trt_cache_dir

    assert main(["predict", str(tmp_path), "--backend", "onnx", "--no-cuda-graphs", "A fine film."]) == 2
    assert "--no-cuda-graphs, --dtype and --compile apply to --backend torch" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--backend", "onnx", "--compile", "default", "A fine film."]) == 2
    assert "--compile apply to --backend torch" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cuda_graphs apply to the torch backend"):
        onnx_options(tmp_path, "cpu", {"cuda_graphs": False})
    bundle = tmp_path / "bundles" / "sst2"
    assert trt_cache_dir(bundle) == (tmp_path / "bundles" / "sst2.trt-cache").resolve()  # beside the bundle, never inside it
    assert onnx_options(bundle, "cpu", {"intra_op_num_threads": 1}) == {"intra_op_num_threads": 1}


def test_serve_and_predict_take_the_gpu_options() -> None:
    from fsserve.cli import build_parser

    args = build_parser().parse_args(["serve", "runs/x", "--device", "cuda", "--no-cuda-graphs", "--dtype", "float16"])
    assert (args.device, args.no_cuda_graphs, args.dtype) == ("cuda", True, "float16")
    args = build_parser().parse_args(["predict", "runs/x", "a", "--device", "cuda:1", "b"])
    assert (args.device, args.no_cuda_graphs, args.dtype, args.compile, args.texts) == ("cuda:1", False, None, None, ["a", "b"])
    args = build_parser().parse_args(["serve", "runs/x", "--device", "cuda", "--compile", "default"])
    assert args.compile == "default"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "runs/x", "--compile", "reduce-overhead"])  # its own cudagraphs would nest in ours


def test_the_server_checks_its_compile_mode_and_the_cpu_refuses_it(tiny_lm: Any) -> None:
    from fsserve.predictor import Predictor
    from fsserve.serving.config import ServerConfig

    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        ServerConfig(models={"m": "runs/x"}, compile="fast")
    assert ServerConfig(models={"m": "runs/x"}, compile="default").compile == "default"
    model, _ = _pair(tiny_lm, "bert")
    with pytest.raises(ValueError, match="compile only apply to the CUDA-graph backend"):
        Predictor.from_model(model, device="cpu", compile="default")
