"""The runtime install: `pip install fsserve[serve]` predicts and serves a bundle with demonstrations, with no torch at all.

A fresh virtual environment gets the package and its pinned base + [serve] dependencies (pip's cache
makes that quick); then `fsserve predict` and `fsserve serve` + `fsserve client` run there on a
bundle exported here, and their probabilities are compared with this environment's Predictor.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fsserve.config import DemoConfig, PromptConfig
from fsserve.data import Example
from fsserve.demos import DemoIndex
from fsserve.modeling import PromptModel
from fsserve.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
POOL = [Example("a warm and funny film", label="1"), Example("a superb, moving story", label="1"),
        Example("lovely acting throughout", label="1"), Example("boring and far too long", label="0"),
        Example("an awful, clumsy script", label="0"), Example("dreadful pacing and dull jokes", label="0")]
TEXTS = ["What a lovely film.", "Dull, dull, dull."]
TRAINING_ONLY = ("torch", "transformers", "peft", "sentence_transformers", "safetensors", "onnx")


@pytest.fixture(scope="module")
def bundle(tiny_lm: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny prompt model with a demonstration pool (similar picks at prediction), exported."""
    lm, tokenizer = tiny_lm("bert")
    model = PromptModel(lm, tokenizer, PromptConfig("{sent_0} It was {mask}.", {"0": "terrible", "1": "great"}, max_length=96))
    model.attach_demos(DemoIndex(POOL, labels=["0", "1"]), DemoConfig(eval_mode="top1"))
    return model.export(tmp_path_factory.mktemp("runtime") / "bundle", optimize=False)


@pytest.fixture(scope="module")
def runtime_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding fsserve's runtime install only: the base dependencies and [serve]."""
    env = tmp_path_factory.mktemp("venv") / "runtime"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=300)
    python = env / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{REPO}[serve]"],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return env


def _site_packages_mb(env: Path) -> float:
    """Installed size of an environment's packages, in MiB (reported beside the full install's in RESULTS.md)."""
    root = next((env / "lib").glob("python*/site-packages"))
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20


def test_the_runtime_install_has_no_training_stack(runtime_env: Path) -> None:
    python = runtime_env / "bin" / "python"
    probe = "import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in %r}))" % (TRAINING_ONLY,)
    found = json.loads(subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True, timeout=120).stdout)
    assert not any(found.values()), found
    assert _site_packages_mb(runtime_env) < 600


def test_predict_without_torch_picks_demonstrations_and_matches(runtime_env: Path, bundle: Path) -> None:
    expected = Predictor.from_pretrained(bundle, backend="onnx").predict_proba(TEXTS)
    result = subprocess.run([str(runtime_env / "bin" / "fsserve"), "predict", str(bundle), *TEXTS, "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["text"] for r in rows] == TEXTS
    np.testing.assert_allclose([r["probs"] for r in rows], expected, atol=1e-5)


def test_serve_and_client_without_torch(runtime_env: Path, bundle: Path) -> None:
    expected = Predictor.from_pretrained(bundle, backend="onnx").predict_proba(TEXTS)
    server = subprocess.Popen([str(runtime_env / "bin" / "fsserve"), "serve", f"demo={bundle}", "--port", "0", "--metrics-port", "-1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        deadline = time.monotonic() + 120
        assert server.stdout is not None
        while port is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                break
            match = re.match(r"serving .* on [\d.]+:(\d+)", line)
            port = int(match.group(1)) if match else None
        assert port, "the server did not start"
        client = subprocess.run([str(runtime_env / "bin" / "fsserve"), "client", *TEXTS, "--url", f"127.0.0.1:{port}", "--model", "demo",
                                 "--json"], capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr
        rows = [json.loads(line) for line in client.stdout.strip().splitlines()]
        np.testing.assert_allclose([[r["probs"][label] for label in ("0", "1")] for r in rows], expected, atol=1e-5)
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert server.returncode == 0


def test_training_on_the_runtime_install_names_the_extra(tmp_path: Path) -> None:
    code = "import sys; sys.modules['torch'] = None\nfrom fsserve.cli import main\nsys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, "eval", "embedded", "--task", "SST-2"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env=dict(os.environ))
    assert result.returncode == 2
    assert "pip install 'fsserve[train]'" in result.stderr and "Traceback" not in result.stderr
