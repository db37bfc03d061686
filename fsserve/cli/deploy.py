"""`fsserve deploy ray`: the command-line face of fsserve.serving.ray_app (Ray Serve replicas of the Predictor).

``add_deploy_parser(subparsers)`` adds ``deploy`` (with the target ``ray``) to the main parser in
fsserve/cli/main.py; the command runs until SIGTERM/SIGINT, then takes the application down.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from fsserve.cli.args import check_model_source

logger = logging.getLogger("fsserve.cli")


def parse_autoscale(value: str) -> tuple[int, int]:
    """``MIN,MAX`` → (MIN, MAX), or a ValueError naming what is wrong with it."""
    low, sep, high = value.partition(",")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError(f"--autoscale takes MIN,MAX (two whole numbers, e.g. 1,4), got {value!r}")
    return int(low), int(high)


def cmd_deploy_ray(args: argparse.Namespace) -> int:
    """Run the bundles as a Ray Serve application until SIGTERM/SIGINT, then delete it (and stop a Ray it started)."""
    from fsserve.serving.config import parse_model_spec

    models: dict[str, str] = {}
    for spec in args.models:
        name, path = parse_model_spec(spec)
        check_model_source(path, saved=True)
        if name in models:
            raise ValueError(f"model name {name!r} is given twice; name them apart with NAME=PATH")
        models[name] = path
    if args.replicas is not None and args.autoscale is not None:
        raise ValueError("give --replicas N or --autoscale MIN,MAX, not both")
    try:
        from fsserve.serving.ray_app import RayServeConfig, start_ray_serve, stop_ray_serve

        config = RayServeConfig(
            models=models, num_replicas=args.replicas or 1, autoscale=parse_autoscale(args.autoscale) if args.autoscale else None,
            max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000, max_ongoing_requests=args.max_ongoing_requests,
            intra_op_num_threads=args.threads, replica_cpus=args.replica_cpus, max_text_bytes=args.max_text_bytes,
        )
        endpoints = start_ray_serve(config, address=args.address, http_host=args.host, http_port=args.http_port,
                                    grpc_port=None if args.grpc_port < 0 else args.grpc_port, num_cpus=args.num_cpus,
                                    request_timeout_s=args.request_timeout)
    except ImportError as exc:
        print(f"fsserve deploy: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own handlers
        signal.signal(sig, lambda *_: stop.set())
    scale = f"autoscaling {config.autoscale[0]}-{config.autoscale[1]} replicas" if config.autoscale else f"{config.num_replicas} replica(s)"
    grpc = f", KServe v2 gRPC on {endpoints['grpc']}" if endpoints["grpc"] else ""
    print(f"Ray Serve: {', '.join(endpoints['models'])} on {scale}; KServe v2 HTTP on {endpoints['http']}{grpc}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        stop_ray_serve(keep_cluster=args.address is not None)
    print("stopped", flush=True)
    return 0


def add_deploy_parser(subparsers: Any) -> None:
    """Add the `deploy` subcommand (target: `ray`) to the main parser's subparsers."""
    deploy = subparsers.add_parser("deploy", help="run bundles on a distributed serving engine (Ray Serve)")
    targets = deploy.add_subparsers(dest="target", required=True, parser_class=type(deploy))
    p = targets.add_parser("ray", help="Ray Serve replicas of the Predictor behind Ray's KServe v2 HTTP (and gRPC) proxy")
    p.add_argument("models", nargs="+", metavar="BUNDLE", help="exported bundle folder; NAME=PATH names the model (default: folder name)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, help="a fixed number of replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN,MAX", help="let Ray's autoscaler keep between MIN and MAX replicas")
    p.add_argument("--address", help="join this Ray cluster (e.g. auto, after `ray start`; default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray this starts (default: all)")
    p.add_argument("--host", default="127.0.0.1", help="address Ray's proxies bind (default 127.0.0.1: this machine only)")
    p.add_argument("--http-port", type=int, default=8000, help="Ray's HTTP proxy port")
    p.add_argument("--grpc-port", type=int, default=9000, help="Ray's gRPC proxy port (-1: no gRPC)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most rows Ray's batcher joins into one call (and per request)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    p.add_argument("--max-ongoing-requests", type=int, default=64, help="requests in flight per replica")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per replica")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves for each replica")
    p.add_argument("--max-text-bytes", type=int, default=8192, help="longest accepted text, in UTF-8 bytes")
    p.add_argument("--request-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="the proxies answer a request unanswered after this long with 408 / DEADLINE_EXCEEDED (0: no limit)")
    p.set_defaults(func=cmd_deploy_ray)
