"""ServerConfig: everything `fsserve serve` needs to know, as one JSON-round-tripping dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fsserve.config import GRAPH_COMPILE_MODES, _JsonConfig

BACKENDS = ("auto", "torch", "onnx")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the largest request either protocol takes (gRPC message, HTTP body)


def parse_model_spec(spec: str) -> tuple[str, str]:
    """Turn a command-line model spec (``PATH`` or ``NAME=PATH``) into (name, path); the name defaults to the folder name."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("a model spec must be a non-empty PATH or NAME=PATH")
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = Path(spec.rstrip("/\\")).name
    if not name or not path:
        raise ValueError(f"bad model spec {spec!r}: use PATH or NAME=PATH")
    return name, path


@dataclass
class ServerConfig(_JsonConfig):
    """How to serve: which models, where to listen, how to batch, and the limits that keep the server up.

    >>> cfg = ServerConfig(models={"sst2": "runs/sst2"}, port=0, max_batch_size=16)
    >>> ServerConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> cfg.host
    '127.0.0.1'
    """

    models: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8001
    metrics_port: int | None = 8002
    http_port: int | None = None  # KServe v2 over HTTP/JSON on this port; None: gRPC only
    max_batch_size: int = 32
    # 0: batches form from what queued while the model ran. Against 5 ms it served 2723 vs 2401 req/s at
    # concurrency 32 and 4.2 vs 10.2 ms at 1 (bench_server_ceiling.py, a 3.4 ms model).
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 256
    max_text_bytes: int = 8192
    backend: str = "auto"
    device: str | None = None
    cuda_graphs: bool | None = None  # torch on CUDA: captured graphs unless False
    dtype: str | None = None  # torch: None is bfloat16 with CUDA graphs, the model's own dtype otherwise
    compile: str | None = None  # torch with CUDA graphs: a torch.compile mode for the forward before capture
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None
    grace_period_s: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.models, dict) or not self.models:
            raise ValueError("models must map at least one model name to a saved model or bundle folder")
        for name, path in self.models.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"model name {name!r} must be a non-empty string without '/'")
            if not isinstance(path, str) or not path:
                raise ValueError(f"model {name!r} needs a folder path, got {path!r}")
        for attr, low in (("max_batch_size", 1), ("max_queue_size", 1), ("max_text_bytes", 1)):
            value = getattr(self, attr)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{attr} must be an integer of at least {low}, got {value!r}")
        for attr in ("port", "metrics_port", "http_port"):
            value = getattr(self, attr)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= 65535):
                raise ValueError(f"{attr} must be a port number 0-65535 (0 picks a free one), got {value!r}")
        if self.max_queue_delay_ms < 0 or self.grace_period_s < 0:
            raise ValueError("max_queue_delay_ms and grace_period_s must not be negative")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: use one of {', '.join(BACKENDS)}")
        if self.compile is not None and self.compile not in GRAPH_COMPILE_MODES:
            raise ValueError(f"unknown compile mode {self.compile!r}: use one of {', '.join(GRAPH_COMPILE_MODES)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (or neither)")
        if self.token is not None and not self.token.strip():
            raise ValueError("token must not be empty; leave it unset to turn auth off")

    @classmethod
    def from_specs(cls, specs: list[str], **kwargs: object) -> ServerConfig:
        """Build a config from command-line model specs (``PATH`` or ``NAME=PATH``), refusing duplicate names."""
        models: dict[str, str] = {}
        for spec in specs:
            name, path = parse_model_spec(spec)
            if name in models:
                raise ValueError(f"two models are named {name!r}: give one of them a name with NAME=PATH")
            models[name] = path
        return cls(models=models, **kwargs)  # type: ignore[arg-type]

    @property
    def tls(self) -> bool:
        """Whether the gRPC port speaks TLS."""
        return self.tls_cert is not None
