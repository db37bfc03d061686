"""Ray Serve: replicas of the fsserve Predictor behind Ray's HTTP (and gRPC) proxy, answering KServe v2.

Each replica loads the bundles itself and answers through the same ``InferenceServicer`` as
``fsserve serve`` (``tensors.decode_request`` validates, ``encode_response`` encodes, ``rest.py``
converts JSON, ``status.HTTP_STATUS`` gives each failure its HTTP status), so a request is checked
and refused with the same message whichever server carries it. Only the batching is Ray's own:
``serve.batch`` gathers concurrent requests of one model (counted in rows) into one
``predict_proba`` call, run off the replica's event loop. Over gRPC Ray's proxy calls the
replica's KServe v2 methods (``ModelInfer`` …) by name; every HTTP answer carries the replica
that made it in the ``fsserve-replica`` header.

Ray is imported only inside functions: ``import fsserve.serving`` never needs it, and a missing
Ray raises an ImportError naming the ``[ray]`` extra.

>>> config = RayServeConfig(models={"sst2": "bundles/sst2"}, num_replicas=2)  # doctest: +SKIP
>>> deployment_options(config)["num_replicas"]  # doctest: +SKIP
2
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fsserve.serving.config import MAX_MESSAGE_BYTES
from fsserve.serving.protos import grpc_predict_v2_pb2 as pb
from fsserve.serving.rest import BINARY_EXTENSION, HEADER_LENGTH, encode_infer_response, model_metadata_json, parse_infer_request
from fsserve.serving.servicer import InferenceServicer, ServedModel
from fsserve.serving.status import RequestTooLarge, ServingError, http_status

logger = logging.getLogger(__name__)

APP_NAME = "fsserve"
REPLICA_HEADER = "fsserve-replica"
GRPC_SERVICER = "fsserve.serving.protos.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"
_MODEL_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?$")


def require_ray() -> tuple[Any, Any]:
    """``(ray, ray.serve)``, or an ImportError that names the extra to install."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ImportError(f"Ray Serve is not installed ({exc}); it comes with the [ray] extra: pip install 'fsserve[ray]'") from exc
    return ray, serve


@dataclass
class RayServeConfig:
    """What one Ray Serve application of fsserve replicas serves, and how it scales and batches.

    ``autoscale=(min, max)`` replaces ``num_replicas`` with Ray's autoscaler, which keeps about
    ``target_ongoing_requests`` requests in flight per replica.

    >>> RayServeConfig(models={"sst2": "bundles/sst2"}, autoscale=(1, 4)).autoscale  # doctest: +SKIP
    (1, 4)
    """

    models: dict[str, str]
    num_replicas: int = 1
    autoscale: tuple[int, int] | None = None
    target_ongoing_requests: float = 16.0
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005
    max_ongoing_requests: int = 64
    intra_op_num_threads: int = 1
    replica_cpus: float = 1.0
    max_text_bytes: int = 8192
    backend: str = "onnx"
    extra_actor_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("give at least one bundle to deploy")
        for name, path in self.models.items():
            if not Path(path, "manifest.json").is_file():
                raise ValueError(f"model {name!r}: {path} is not an exported bundle (no manifest.json); export it with `fsserve export`")
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {self.num_replicas}")
        if self.autoscale is not None and not 0 <= self.autoscale[0] <= self.autoscale[1] >= 1:
            raise ValueError(f"autoscale must be MIN,MAX with 0 <= MIN <= MAX and MAX >= 1, got {self.autoscale}")
        for name in ("max_batch_size", "max_ongoing_requests", "intra_op_num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_wait_timeout_s < 0 or self.replica_cpus < 0:
            raise ValueError("batch_wait_timeout_s and replica_cpus must not be negative")


def deployment_options(config: RayServeConfig) -> dict[str, Any]:
    """The ``serve.deployment`` options for a config: replicas or autoscaling, CPUs, requests in flight."""
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": config.replica_cpus, **config.extra_actor_options},
    }
    if config.autoscale is None:
        options["num_replicas"] = config.num_replicas
    else:
        low, high = config.autoscale
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                         "target_ongoing_requests": config.target_ongoing_requests}
    return options


class RayServedModel(ServedModel):
    """A ServedModel whose requests are batched by Ray Serve's ``serve.batch`` instead of fsserve's batcher."""

    def __init__(self, name: str, predictor: Any, config: RayServeConfig) -> None:
        from ray import serve

        self.name, self.predictor, self.platform, self.version = name, predictor, f"fsserve_{config.backend}", "1"
        self.labels = list(predictor.labels)
        self.num_sentences = int(getattr(predictor, "num_sentences", 1))
        self.max_rows = config.max_batch_size
        self.ready = True
        self._run_batch = serve.batch(max_batch_size=config.max_batch_size, batch_wait_timeout_s=config.batch_wait_timeout_s,
                                      batch_size_fn=lambda items: sum(len(texts) for texts, _ in items))(self._classify_batch)

    async def _classify_batch(self, items: list[tuple[list[str], list[str] | None]]) -> list[np.ndarray]:
        """One predict_proba call for every request Ray gathered, off the event loop; split back per request."""
        texts = [t for rows, _ in items for t in rows]
        texts_b = [t for _, rows in items for t in rows] if self.num_sentences > 1 else None
        probs = await asyncio.get_running_loop().run_in_executor(None, self._predict_proba, texts, texts_b)
        bounds = np.cumsum([len(rows) for rows, _ in items])[:-1]
        return list(np.split(probs, bounds))

    async def classify(self, texts: list[str], texts_b: list[str] | None = None, timeout: float | None = None) -> np.ndarray:
        """Probabilities for one request, batched by Ray with the others in flight on this replica."""
        return await self._run_batch((texts, texts_b))

    async def start(self) -> None:
        """Nothing to start: Ray's batch queue starts with the first request."""
        self.ready = True

    async def stop(self) -> None:
        """Not ready from now on; Ray drains the replica's requests when it stops the replica."""
        self.ready = False


class FsserveReplica:
    """One Ray Serve replica: the bundles' Predictors, answering KServe v2 over Ray's HTTP and gRPC proxies.

    >>> from fsserve.serving.ray_app import build_app  # doctest: +SKIP
    >>> serve.run(build_app(RayServeConfig(models={"sst2": "bundles/sst2"})), name="fsserve")  # doctest: +SKIP
    """

    def __init__(self, config: RayServeConfig) -> None:
        from ray import serve

        from fsserve.predictor import Predictor

        self.replica = serve.get_replica_context().replica_id.unique_id
        try:  # a replica's FAISS searches stay within the threads it was given, as onnxruntime's do
            import faiss

            faiss.omp_set_num_threads(config.intra_op_num_threads)
        except ImportError:
            pass
        models = {}
        for name, path in config.models.items():
            start = time.perf_counter()
            predictor = Predictor.from_pretrained(path, backend=config.backend, batch_size=config.max_batch_size,
                                                  intra_op_num_threads=config.intra_op_num_threads)
            models[name] = RayServedModel(name, predictor, config)
            logger.info("event=model_loaded replica=%s model=%s path=%s seconds=%.2f", self.replica, name, path, time.perf_counter() - start)
        self.servicer = InferenceServicer(models, max_text_bytes=config.max_text_bytes, is_ready=lambda: True)

    # -- HTTP: Ray's proxy hands over a starlette Request -----------------------------------------
    async def __call__(self, request: Any) -> Any:
        """Answer one KServe v2 HTTP request; failures become the v2 error body under HTTP_STATUS's status."""
        from starlette.responses import JSONResponse

        headers = {REPLICA_HEADER: self.replica}
        try:
            return await self._route(request, headers)
        except ServingError as exc:
            logger.info("event=http code=%s path=%s message=%r", exc.code.name, request.url.path, exc.message)
            return JSONResponse({"error": exc.message}, status_code=http_status(exc), headers=headers)
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the replica down
            logger.exception("event=unhandled_error path=%s", request.url.path)
            return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500, headers=headers)

    async def _route(self, request: Any, headers: dict[str, str]) -> Any:
        """Dispatch on method and path as fsserve serve's HTTP front end does."""
        from starlette.responses import JSONResponse, Response

        path, method = request.url.path.rstrip("/") or "/", request.method
        match = _MODEL_PATH.match(path)
        action = match["action"] if match else None
        wanted = "POST" if action == "/infer" else "GET"
        if not (match or path in ("/v2", "/v2/health/live", "/v2/health/ready")):
            return JSONResponse({"error": f"Not Found: {method} {path}"}, status_code=404, headers=headers)
        if method != wanted:
            return JSONResponse({"error": f"Method Not Allowed: {method} {path}"}, status_code=405, headers=headers)
        if path == "/v2/health/live":
            return JSONResponse({"live": True}, headers=headers)
        if path == "/v2/health/ready":
            return JSONResponse({"ready": True}, headers=headers)
        if path == "/v2":
            metadata = self.servicer.server_metadata()
            body = {"name": metadata.name, "version": metadata.version, "extensions": [*metadata.extensions, BINARY_EXTENSION]}
            return JSONResponse(body, headers=headers)
        model, version = match["model"], match["version"] or ""
        if action == "/ready":
            ready = self.servicer.model_ready(model, version)
            return JSONResponse({"ready": ready}, status_code=200 if ready else 503, headers=headers)
        if action is None:
            return JSONResponse(model_metadata_json(self.servicer.model_metadata(model, version)), headers=headers)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_MESSAGE_BYTES:
            raise RequestTooLarge(f"request body is {declared} bytes; the limit is {MAX_MESSAGE_BYTES}")
        parsed = parse_infer_request(await request.body(), request.headers.get(HEADER_LENGTH), model, version)
        payload, header_length = encode_infer_response(await self.servicer.infer(parsed.request), parsed)
        if header_length is None:
            return Response(payload, media_type="application/json", headers=headers)
        return Response(payload, media_type="application/octet-stream", headers={**headers, HEADER_LENGTH: str(header_length)})

    # -- gRPC: Ray's proxy calls the KServe v2 methods by name ------------------------------------
    async def _grpc(self, grpc_context: Any, call: Any, *args: Any) -> Any:
        """Run one servicer call; a ServingError sets its status code and message on Ray's gRPC context.

        The answer's trailing metadata names the replica (``fsserve-replica``), as the HTTP header does.
        """
        if grpc_context is not None:
            grpc_context.set_trailing_metadata([(REPLICA_HEADER, self.replica)])
        try:
            answer = call(*args)
            return await answer if asyncio.iscoroutine(answer) else answer
        except ServingError as exc:
            if grpc_context is not None:
                grpc_context.set_code(exc.code)
                grpc_context.set_details(exc.message)
            raise

    async def ModelInfer(self, request: pb.ModelInferRequest, grpc_context: Any = None) -> pb.ModelInferResponse:
        """KServe v2 ModelInfer through the shared servicer."""
        return await self._grpc(grpc_context, self.servicer.infer, request)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, grpc_context: Any = None) -> pb.ModelMetadataResponse:
        """KServe v2 ModelMetadata (NOT_FOUND for an unknown model)."""
        return await self._grpc(grpc_context, self.servicer.model_metadata, request.name, request.version)

    async def ModelReady(self, request: pb.ModelReadyRequest, grpc_context: Any = None) -> pb.ModelReadyResponse:
        """Whether a model is served here (an unknown one is simply not ready)."""
        return pb.ModelReadyResponse(ready=self.servicer.model_ready(request.name, request.version))

    async def ServerLive(self, request: pb.ServerLiveRequest, grpc_context: Any = None) -> pb.ServerLiveResponse:
        """Live while the replica answers."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, grpc_context: Any = None) -> pb.ServerReadyResponse:
        """Ready once the replica has loaded its models (Ray routes only to started replicas)."""
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, grpc_context: Any = None) -> pb.ServerMetadataResponse:
        """fsserve's name and version."""
        return self.servicer.server_metadata()


def build_app(config: RayServeConfig) -> Any:
    """The Ray Serve application (not yet running): one deployment of FsserveReplica with the config's scaling."""
    _, serve = require_ray()
    return serve.deployment(FsserveReplica, name="FsserveReplica", **deployment_options(config)).bind(config)


def start_ray_serve(config: RayServeConfig, address: str | None = None, http_host: str = "127.0.0.1", http_port: int = 8000,
                    grpc_port: int | None = 9000, num_cpus: int | None = None, request_timeout_s: float | None = 60.0) -> dict[str, Any]:
    """Join the Ray cluster at ``address`` (or start a local one), start Serve's proxies and run the app; return the endpoints.

    ``request_timeout_s``: the proxies answer a request still unanswered after this long with HTTP 408
    or DEADLINE_EXCEEDED instead of holding it (a request can hang on a replica that died under it);
    None or 0: no limit.
    """
    if request_timeout_s is not None and request_timeout_s < 0:
        raise ValueError(f"request_timeout_s must not be negative, got {request_timeout_s}")
    timeout = {"request_timeout_s": request_timeout_s} if request_timeout_s else {}
    ray, serve = require_ray()
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False, log_to_driver=False)
    grpc_options = {"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER], **timeout} if grpc_port is not None else None
    serve.start(http_options={"host": http_host, "port": http_port, **timeout}, grpc_options=grpc_options)
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    logger.info("event=ray_serve_running models=%s http=%s:%d grpc=%s", ",".join(config.models), http_host, http_port, grpc_port)
    return {"http": f"http://{http_host}:{http_port}", "grpc": None if grpc_port is None else f"{http_host}:{grpc_port}",
            "models": sorted(config.models)}


def stop_ray_serve(keep_cluster: bool = False) -> None:
    """Delete the app; unless the cluster is someone else's (``keep_cluster``), shut Serve and Ray down too."""
    ray, serve = require_ray()
    if not ray.is_initialized():
        return
    if keep_cluster:
        serve.delete(APP_NAME)
    else:
        serve.shutdown()
        ray.shutdown()
    logger.info("event=ray_serve_stopped keep_cluster=%s", keep_cluster)
