"""The sentence encoder as ONNX: a saved pool embeds queries without torch and picks what sentence-transformers picks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fsserve.data import Example
from fsserve.demos import DemoIndex
from fsserve.demos.encoder import DEFAULT_ENCODER, load_encoder
from fsserve.demos.onnx_encoder import OnnxSentenceEncoder, export_sentence_encoder

POOL = [Example(t, label=lab) for t, lab in [
    ("A warm, funny film.", "1"), ("Gorgeous photography and a moving score.", "1"), ("The best thing I saw this year.", "1"),
    ("Every performance lands.", "1"), ("Dull and far too long.", "0"), ("The plot never comes together.", "0"),
    ("I checked my watch three times.", "0"), ("Loud, shapeless and tiresome.", "0")]]
QUERIES = ["A lovely, touching picture.", "Boring from start to finish.", "The acting is flat and the jokes fall flat too.",
           "A clever script that trusts its audience.", "so dull", "Superb!"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoIndex, Path]:
    """One pool embedded by sentence-transformers, saved with its ONNX encoder."""
    index = DemoIndex(POOL, labels=["0", "1"], device="cpu")
    path = index.save(tmp_path_factory.mktemp("pool") / "demos", onnx_encoder=True)
    return index, path


def test_the_onnx_encoder_gives_sentence_transformers_vectors(saved: tuple[DemoIndex, Path]) -> None:
    _, path = saved
    onnx = OnnxSentenceEncoder(path / "encoder")
    torch_model = load_encoder(DEFAULT_ENCODER, "cpu")
    long = " ".join(["a very long review"] * 200)  # longer than the encoder's 256 tokens: truncated alike
    texts = QUERIES + [long]
    expected = torch_model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    got = onnx.encode(texts, batch_size=3)
    assert got.shape == expected.shape == (len(texts), onnx.get_embedding_dimension())
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_a_loaded_pool_picks_what_the_torch_encoder_picks(saved: tuple[DemoIndex, Path]) -> None:
    index, path = saved
    loaded = DemoIndex.load(path, device="cpu")
    assert loaded._encoder is not None  # the ONNX encoder, not sentence-transformers
    for mode in ("top1", "similar"):
        np.testing.assert_array_equal(loaded.select(QUERIES, mode=mode, rng=3), index.select(QUERIES, mode=mode, rng=3))
    meta = json.loads((path / "demo_index.json").read_text())
    assert {"encoder/model.onnx", "encoder/tokenizer.json", "encoder/encoder.json"} <= set(meta["sha256"])


def test_a_tampered_encoder_is_refused(saved: tuple[DemoIndex, Path], tmp_path: Path) -> None:
    import shutil

    _, path = saved
    copy = tmp_path / "demos"
    shutil.copytree(path, copy)
    (copy / "encoder" / "encoder.json").write_text(json.dumps({"name": "other"}))
    with pytest.raises(ValueError, match="encoder/encoder.json is missing or does not match its sha256"):
        DemoIndex.load(copy)


def test_embedding_a_query_needs_no_torch(saved: tuple[DemoIndex, Path]) -> None:
    _, path = saved
    code = ("import sys; sys.modules['torch'] = None; sys.modules['sentence_transformers'] = None\n"
            "from fsserve.demos import DemoIndex\n"
            f"index = DemoIndex.load({str(path)!r}, device='cpu')\n"
            f"print(index.select({QUERIES!r}, mode='top1').tolist())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    picks = json.loads(result.stdout.strip().splitlines()[-1])
    assert picks == saved[0].select(QUERIES, mode="top1").tolist()


def test_an_encoder_that_cannot_be_exported_is_named(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no-such-encoder|not"):
        export_sentence_encoder("/no-such-encoder", tmp_path / "enc")
    assert not (tmp_path / "enc").exists()
