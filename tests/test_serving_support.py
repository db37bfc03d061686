"""Shared pieces of the serving tests: tiny served models, servers on free loopback ports, TLS material.

Holds fixtures and helpers only (no tests); the other tests/test_serving*.py modules import them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fsserve.config import PromptConfig
from fsserve.serving.config import ServerConfig
from fsserve.serving.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from fsserve.serving.server import BackgroundServer

REPO = Path(__file__).resolve().parents[1]
SINGLE_TEMPLATE = "{sent_0} It was {mask}."
PAIR_TEMPLATE = "{sent_0} ? {mask} , {sent_1}"


def _spread_weights(lm: torch.nn.Module, seed: int) -> None:
    """Redraw the matrices at std 0.5: at the default 0.02 a tiny random LM gives every text the same probabilities."""
    with torch.no_grad():
        torch.manual_seed(seed)
        for param in lm.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.5)


def save_tiny_model(tiny_lm: Callable[[str], tuple[Any, Any]], folder: Path, pair: bool = False, **bert: int) -> Path:
    """Save a tiny BERT prompt model (single-sentence sentiment, or an entailment pair model) to ``folder``."""
    import transformers as tf

    from fsserve.modeling import PromptModel

    lm, tokenizer = tiny_lm("bert")
    if bert:
        torch.manual_seed(1234)
        lm = tf.BertForMaskedLM(tf.BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **bert)).eval()
    _spread_weights(lm, seed=7 if not pair else 11)
    if pair:
        prompt = PromptConfig(PAIR_TEMPLATE, {"entailment": "yes", "not_entailment": "no"})
    else:
        prompt = PromptConfig(SINGLE_TEMPLATE, {"0": "terrible", "1": "great"})
    PromptModel(lm, tokenizer, prompt).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Callable[[str], tuple[Any, Any]]) -> dict[str, Path]:
    """Saved tiny models: ``sst2`` (one sentence, labels 0/1) and ``rte`` (pairs, entailment/not_entailment)."""
    root = tmp_path_factory.mktemp("served")
    return {"sst2": save_tiny_model(tiny_lm, root / "sst2"), "rte": save_tiny_model(tiny_lm, root / "rte", pair=True)}


@pytest.fixture(scope="session")
def reference(model_dirs: dict[str, Path]) -> dict[str, Any]:
    """The same models as plain Predictors: what every served answer is compared with."""
    from fsserve.predictor import Predictor

    return {name: Predictor.from_pretrained(path) for name, path in model_dirs.items()}


def start_server(model_dirs: dict[str, Path], **overrides: Any) -> BackgroundServer:
    """A BackgroundServer on free loopback ports serving the given models."""
    settings: dict[str, Any] = dict(port=0, metrics_port=0, max_queue_delay_ms=5.0, grace_period_s=2.0)
    settings.update(overrides)
    return BackgroundServer(ServerConfig(models={k: str(v) for k, v in model_dirs.items()}, **settings)).start()


@pytest.fixture()
def server_factory(model_dirs: dict[str, Path]) -> Iterator[Callable[..., BackgroundServer]]:
    """Start servers with custom settings; every one is stopped when the test ends."""
    started: list[BackgroundServer] = []

    def make(**overrides: Any) -> BackgroundServer:
        server = start_server(model_dirs, **overrides)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(grace=1.0)


def stub(port: int, credentials: grpc.ChannelCredentials | None = None) -> tuple[grpc.Channel, pb_grpc.GRPCInferenceServiceStub]:
    """A raw grpcio channel and stub to 127.0.0.1:port."""
    target = f"127.0.0.1:{port}"
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def metrics_text(port: int) -> str:
    """Fetch /metrics from the server's Prometheus endpoint."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def free_port() -> int:
    """A loopback port free right now (for a subprocess server that must be told its port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1/localhost and its key; return (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1)).add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def spawn_server(args: list[str], timeout: float = 120.0) -> tuple[subprocess.Popen[str], list[str]]:
    """Run ``python -m fsserve serve ARGS`` and wait for its "serving" line; return the process and its output so far."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fsserve", "-v", "serve", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("serving "):
            return proc, lines
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))
