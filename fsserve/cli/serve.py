"""`fsserve serve` and `fsserve client`: the command-line face of fsserve.serving.

``add_serve_parsers(subparsers)`` adds both subcommands to the main parser in fsserve/cli/main.py; each
sets ``func`` to a ``cmd_*`` function taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from fsserve.cli.args import add_torch_device_args, check_model_source

logger = logging.getLogger("fsserve.cli")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the given bundles or saved models until SIGTERM/SIGINT, then drain and exit 0."""
    from fsserve.serving import ServerConfig, serve
    from fsserve.serving.config import parse_model_spec

    for spec in args.models:
        check_model_source(parse_model_spec(spec)[1], saved=True)
    config = ServerConfig.from_specs(
        list(args.models),
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        http_port=args.http_port,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        max_queue_size=args.max_queue_size,
        max_text_bytes=args.max_text_bytes,
        backend=args.backend,
        device=args.device,
        cuda_graphs=False if args.no_cuda_graphs else None,
        dtype=args.dtype,
        compile=args.compile,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=args.token,
        grace_period_s=args.grace_period,
    )

    def announce(server: Any) -> None:
        metrics = f", metrics on http://{config.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
        http = f", HTTP/REST on {config.host}:{server.http_port}" if server.http_port else ""
        print(f"serving {', '.join(server.models)} on {config.host}:{server.port} ({'TLS' if config.tls else 'plaintext'}{http}{metrics})", flush=True)

    serve(config, on_started=announce)
    print("stopped", flush=True)
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    """Classify texts through a running server and print one line per text: label, probabilities, text."""
    import grpc

    from fsserve.serving import InferenceClient

    texts = list(args.texts)
    texts_b = list(args.text_b) if args.text_b else None
    if not texts:
        raise ValueError("give at least one text to classify")
    if texts_b is not None and len(texts_b) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(texts_b)} --text-b values")
    with InferenceClient(args.url, token=args.token, root_certificates=args.tls_ca, timeout=args.timeout) as client:
        try:
            result = client.classify(args.model, texts, texts_b)
        except grpc.RpcError as exc:
            print(f"fsserve client: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    names = result.label_names or [str(i) for i in range(result.probs.shape[1])]
    for i, (text, label) in enumerate(zip(texts, result.labels)):
        probs = [float(x) for x in result.probs[i]]
        if args.json:
            print(json.dumps({"text": text, "label": label, "probs": dict(zip(names, [round(p, 6) for p in probs]))}))
        else:
            shown = " ".join(f"{name}={p:.3f}" for name, p in zip(names, probs))
            print(f"{label}\t[{shown}]\t{text}")
    return 0


def add_serve_parsers(subparsers: Any) -> None:
    """Add the `serve` and `client` subcommands to the main parser's subparsers."""
    p = subparsers.add_parser("serve", help="serve bundles or saved models over the KServe v2 protocol (gRPC, and HTTP with --http-port)")
    p.add_argument("models", nargs="+", metavar="BUNDLE", help="bundle or saved model folder; NAME=PATH names the model (default: folder name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8001, help="gRPC port (0 picks a free one)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics HTTP port (-1: off)")
    p.add_argument("--http-port", type=int, help="also answer KServe v2 over HTTP/JSON on this port (Triton uses 8000; 0 picks a free one; default: off)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most rows run in one batch (and per request)")
    p.add_argument("--max-queue-delay-ms", type=float, default=0.0,
                   help="how long a request may wait for others to join its batch (default 0: a batch forms from what "
                        "queued while the model was busy, so a lone request never waits)")
    p.add_argument("--max-queue-size", type=int, default=256, help="requests that may wait per model; beyond it RESOURCE_EXHAUSTED")
    p.add_argument("--max-text-bytes", type=int, default=8192, help="longest accepted text, in UTF-8 bytes")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"], help="auto: onnx for bundles, torch for saved models")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available); onnx also takes tensorrt")
    add_torch_device_args(p)
    p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (needs --tls-key)")
    p.add_argument("--tls-key", help="PEM private key for --tls-cert")
    p.add_argument("--token", help="require 'authorization: Bearer TOKEN' on every call (health checks excepted)")
    p.add_argument("--grace-period", type=float, default=30.0, help="seconds accepted calls get to finish after SIGTERM")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("client", help="classify texts through a running fsserve (or KServe v2) server")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify")
    p.add_argument("--url", default="localhost:8001", help="server host:port")
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--text-b", nargs="+", help="second texts, one per TEXT, for sentence-pair models")
    p.add_argument("--token", help="bearer token, when the server requires one")
    p.add_argument("--tls-ca", help="PEM root certificate to trust: connect with TLS")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before the call is given up")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_client)
