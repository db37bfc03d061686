"""A stand-in for Triton around a model repository: what tests can check of it without the server.

Holds helpers only (no tests). ``backend_utils_module()`` is a small ``triton_python_backend_utils``
(Tensor, InferenceRequest/Response, TritonError, the config look-ups) that refuses what Triton
refuses: string-dtype arrays, responses that are not lists. ``Repository`` loads model folders as
Triton does (config.pbtxt parsed with the model-config protobuf tritonclient ships, in text
format; the JSON form handed to ``initialize``; ``VERSION/model.py`` imported fresh) and runs them,
checking every tensor passed between steps against the configs: names, data types, and shapes
``[batch] + dims`` (``-1`` matching any size), with ``reshape`` applied where the model sees it.
ONNX steps run on onnxruntime; requests of equal shapes are merged into one batch, as Triton's
dynamic batcher merges them. What it cannot check: Triton itself (its scheduler, shared memory,
the Python stub process, the server's HTTP/gRPC front ends).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import types
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

NUMPY = {"TYPE_BOOL": np.bool_, "TYPE_UINT8": np.uint8, "TYPE_INT8": np.int8, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64,
         "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64, "TYPE_STRING": np.object_}
_counter = itertools.count()


def backend_utils_module() -> types.ModuleType:
    """A fresh stand-in ``triton_python_backend_utils`` module."""
    module = types.ModuleType("triton_python_backend_utils")

    class TritonError:
        def __init__(self, msg: str) -> None:
            self._msg = msg

        def message(self) -> str:
            return self._msg

    class TritonModelException(Exception):
        pass

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            if not isinstance(array, np.ndarray) or array.dtype.kind in "UV":
                raise TritonModelException(f"tensor {name!r}: the Python backend takes numpy arrays, object dtype for strings")
            self._name, self._array = name, array

        def name(self) -> str:
            return self._name

        def as_numpy(self) -> np.ndarray:
            return self._array

    class InferenceRequest:
        def __init__(self, inputs: list[Tensor], requested_output_names: list[str]) -> None:
            self._inputs, self._outputs = inputs, requested_output_names

        def inputs(self) -> list[Tensor]:
            return self._inputs

        def requested_output_names(self) -> list[str]:
            return self._outputs

    class InferenceResponse:
        def __init__(self, output_tensors: list[Tensor], error: TritonError | None = None) -> None:
            if not isinstance(output_tensors, list):
                raise TritonModelException('"output_tensors" must be a list.')
            self._tensors, self._error = output_tensors, error

        def output_tensors(self) -> list[Tensor]:
            return self._tensors

        def has_error(self) -> bool:
            return self._error is not None

        def error(self) -> TritonError | None:
            return self._error

    def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
        return next((t for t in request.inputs() if t.name() == name), None)

    def get_output_config_by_name(config: dict[str, Any], name: str) -> dict[str, Any] | None:
        return next((o for o in config.get("output", []) if o["name"] == name), None)

    def triton_string_to_numpy(type_string: str) -> Any:
        return NUMPY[type_string]

    for value in (TritonError, TritonModelException, Tensor, InferenceRequest, InferenceResponse, get_input_tensor_by_name,
                  get_output_config_by_name, triton_string_to_numpy):
        setattr(module, value.__name__, value)
    return module


def parse_config(folder: Path) -> mc.ModelConfig:
    """A model folder's config.pbtxt, parsed as Triton parses it (protobuf text format, unknown fields refused)."""
    return text_format.Parse((folder / "config.pbtxt").read_text(encoding="utf-8"), mc.ModelConfig())


def config_json(config: mc.ModelConfig) -> str:
    """The model config as Triton hands it to ``initialize``: JSON with proto field names, int64 values as numbers."""
    document = json_format.MessageToDict(config, preserving_proto_field_name=True)
    for key in ("input", "output"):
        for spec in document.get(key, []):
            spec["dims"] = [int(d) for d in spec.get("dims", [])]
    return json.dumps(document)


def check_tensor(spec: Any, array: np.ndarray, batch: int, where: str) -> None:
    """Assert ``array`` is what Triton would accept for config entry ``spec`` in a request of ``batch`` rows."""
    expected = NUMPY[mc.DataType.Name(spec.data_type)]
    assert array.dtype == expected, f"{where}: {spec.name} is {array.dtype}, the config says {mc.DataType.Name(spec.data_type)}"
    if expected is np.object_:
        assert all(isinstance(x, bytes) for x in array.reshape(-1)), f"{where}: {spec.name} must hold bytes"
    dims = [batch, *spec.dims]
    assert len(array.shape) == len(dims) and all(d in (-1, s) for d, s in zip(dims, array.shape)), \
        f"{where}: {spec.name} has shape {list(array.shape)}, the config says {dims}"


class Repository:
    """Load and run the models of a repository folder the way Triton would (see the module docstring)."""

    def __init__(self, root: Path, utils: types.ModuleType) -> None:
        self.root, self.utils = root, utils
        self.python_models: dict[str, Any] = {}
        self.sessions: dict[str, Any] = {}

    def python_model(self, name: str) -> Any:
        """The model's TritonPythonModel, imported from its model.py and initialised once."""
        if name not in self.python_models:
            folder = self.root / name
            config = parse_config(folder)
            assert config.backend == "python", f"{name} is not a Python-backend model"
            spec = importlib.util.spec_from_file_location(f"triton_model_{next(_counter)}", folder / "1" / "model.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            model = module.TritonPythonModel()
            model.initialize({"model_config": config_json(config), "model_repository": str(folder), "model_version": "1",
                              "model_name": name, "model_instance_kind": "CPU", "model_instance_name": f"{name}_0", "model_instance_device_id": "0"})
            self.python_models[name] = model
        return self.python_models[name]

    def run_python(self, name: str, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | str]:
        """One ``execute`` call holding all ``requests`` (a dynamic batch); each answer is its outputs or its error message."""
        config = parse_config(self.root / name)
        batched = []
        for k, tensors in enumerate(requests):
            batch = len(next(iter(tensors.values())))
            assert 0 < batch <= config.max_batch_size, f"{name}: request {k} has {batch} rows, max_batch_size {config.max_batch_size}"
            for spec in config.input:
                check_tensor(spec, tensors[spec.name], batch, f"{name} request {k} input")
            inputs = [self.utils.Tensor(n, a) for n, a in tensors.items()]
            batched.append(self.utils.InferenceRequest(inputs, [o.name for o in config.output]))
        responses = self.python_model(name).execute(batched)
        assert isinstance(responses, list) and len(responses) == len(requests), f"{name}: execute must answer every request once"
        answers: list[dict[str, np.ndarray] | str] = []
        for k, (tensors, response) in enumerate(zip(requests, responses)):
            if response.has_error():
                answers.append(response.error().message())
                continue
            outputs = {t.name(): t.as_numpy() for t in response.output_tensors()}
            assert sorted(outputs) == sorted(o.name for o in config.output), f"{name}: response {k} has {sorted(outputs)}"
            for spec in config.output:
                check_tensor(spec, outputs[spec.name], len(next(iter(tensors.values()))), f"{name} response {k} output")
            answers.append(outputs)
        return answers

    def run_onnx(self, name: str, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """The ONNX step: requests of equal shapes merged into one batch, inputs reshaped as the config says."""
        import onnxruntime as ort

        config = parse_config(self.root / name)
        assert config.platform == "onnxruntime_onnx"
        if name not in self.sessions:
            self.sessions[name] = ort.InferenceSession(str(self.root / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        answers: list[dict[str, np.ndarray]] = [{} for _ in requests]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for k, tensors in enumerate(requests):
            batch = len(next(iter(tensors.values())))
            for spec in config.input:
                check_tensor(spec, tensors[spec.name], batch, f"{name} request {k} input")
            groups.setdefault(tuple((n, a.shape[1:]) for n, a in sorted(tensors.items())), []).append(k)
        for members in groups.values():
            feed = {}
            for spec in config.input:
                merged = np.concatenate([requests[k][spec.name] for k in members])
                feed[spec.name] = merged.reshape([len(merged), *spec.reshape.shape]) if spec.HasField("reshape") else merged
            outputs = self.sessions[name].run([o.name for o in config.output], feed)
            offset = 0
            for k in members:
                rows = len(next(iter(requests[k].values())))
                for spec, array in zip(config.output, outputs):
                    answers[k][spec.name] = array[offset : offset + rows]
                    check_tensor(spec, answers[k][spec.name], rows, f"{name} response {k} output")
                offset += rows
        return answers

    def run_ensemble(self, name: str, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | str]:
        """Run the ensemble's steps in order for a batch of requests; a request that fails a step gets that error."""
        config = parse_config(self.root / name)
        assert config.platform == "ensemble"
        for k, tensors in enumerate(requests):
            sizes = sorted({len(array) for array in tensors.values()})
            assert len(sizes) == 1, f"{name} request {k}: inputs of different batch sizes {sizes}"
            for spec in config.input:
                check_tensor(spec, tensors[spec.name], sizes[0], f"{name} request {k} input")
        state: list[dict[str, np.ndarray] | str] = [dict(t) for t in requests]
        for step in config.ensemble_scheduling.step:
            live = [k for k, s in enumerate(state) if isinstance(s, dict)]
            feeds = [{key: state[k][value] for key, value in step.input_map.items()} for k in live]  # type: ignore[index]
            step_config = parse_config(self.root / step.model_name)
            run = self.run_python if step_config.backend == "python" else self.run_onnx
            for k, answer in zip(live, run(step.model_name, feeds)):
                if isinstance(answer, str):
                    state[k] = answer
                else:
                    state[k].update({value: answer[key] for key, value in step.output_map.items()})  # type: ignore[union-attr]
        results: list[dict[str, np.ndarray] | str] = []
        for k, s in enumerate(state):
            if isinstance(s, str):
                results.append(s)
                continue
            for spec in config.output:
                check_tensor(spec, s[spec.name], len(requests[k]["TEXT"]), f"{name} answer {k}")
            results.append({spec.name: s[spec.name] for spec in config.output})
        return results
