"""The on-disk bundle: a validated ONNX graph, tokenizer, prompt and manifest, saved atomically and loaded verified.

Layout (every file is listed in ``manifest.json`` with its sha256)::

    manifest.json      format version, fsserve/onnx/onnxruntime/opset versions, model name, checksums
    model.onnx         the label-logits graph (fp32, int8 or fp16 as the manifest's ``precision`` says)
    fsserve.json       PromptModel.metadata(): prompt (template, label words, max length, truncation),
                       labels, label word ids, kind, plus the tokenizer's special ids and graph inputs
    tokenizer/         the tokenizer files (tokenizer.json is what the torch-free backend reads)
    torch/             optional: the saved PromptModel (safetensors + JSON), for ``backend="torch"``
    demos/             optional extension point: the demonstration pool and FAISS index. Pass any object
                       with ``save(directory)`` (fsserve.demos.DemoIndex) as ``demos=`` to the export;
                       the manifest then records ``"demos": "demos"`` and :func:`load_bundle_demos`
                       returns ``DemoIndex.load(bundle / "demos")``. Its files are checksummed like all others.

The bundle is written into a temporary sibling folder and renamed into place, so an interrupted
export leaves the destination as it was. Loading refuses a bundle whose manifest, or any file,
fails its checksum, naming the file; files the manifest does not list are refused too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fsserve.utils.atomic import atomic_directory, sha256_file, write_json_atomic

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "fsserve-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "fsserve.json"
TOKENIZER_DIR = "tokenizer"
TORCH_DIR = "torch"
DEMOS_DIR = "demos"
_SPECIAL_IDS = ("mask_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id")
# Strings the tokenizer adapter must encode exactly as the HF tokenizer does before a bundle is written.
_PROBES = ("x", "A fine film.", " great", "It was terrible!", "naïve café, 3.5/10")


class BundleError(ValueError):
    """A bundle that is incomplete, corrupted or of an unknown format (the message names the file)."""


class BundleTokenizer:
    """The slice of the HF tokenizer API that :class:`fsserve.prompts.Prompt` uses, on ``tokenizers`` alone.

    transformers' AutoTokenizer imports torch; this adapter reads ``tokenizer.json`` and the special
    ids recorded at export, so the onnxruntime backend predicts without torch.

    >>> tok = BundleTokenizer.from_folder("bundle/tokenizer", {"mask_token_id": 103, "pad_token_id": 0})  # doctest: +SKIP
    >>> tok("great", add_special_tokens=False)["input_ids"]  # doctest: +SKIP
    [2307]
    """

    def __init__(self, backend: Any, special: dict[str, Any]) -> None:
        self._tokenizer = backend
        for name in _SPECIAL_IDS:
            setattr(self, name, special.get(name))
        self.add_bos_token = bool(special.get("add_bos_token", False))
        self._truncating_copies: dict[int, Any] = {}

    @classmethod
    def from_folder(cls, folder: str | Path, special: dict[str, Any]) -> BundleTokenizer:
        """Load ``tokenizer.json`` from a bundle's tokenizer folder."""
        from tokenizers import Tokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise BundleError(f"{path} is missing: the onnx backend needs the fast tokenizer's tokenizer.json")
        return cls(Tokenizer.from_file(str(path)), special)

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        add_special_tokens: bool = True,
        truncation: bool = False,
        max_length: int | None = None,
        return_token_type_ids: bool = False,
    ) -> dict[str, Any]:
        """Encode one text (or pair) or a batch into ``{"input_ids": ...}`` like an HF tokenizer.

        ``truncation=True`` cuts to ``max_length`` longest-first, as HF fast tokenizers do for pairs;
        ``return_token_type_ids`` adds the segment ids.
        """
        single = isinstance(text, str)
        firsts = [text] if single else list(text)
        inputs: list[Any] = firsts
        if text_pair is not None:
            seconds = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(seconds) != len(firsts):
                raise ValueError(f"{len(firsts)} texts but {len(seconds)} text pairs")
            inputs = list(zip(firsts, seconds))
        backend = self._tokenizer
        if truncation:
            if max_length is None or max_length < 1:
                raise ValueError(f"truncation needs a positive max_length, got {max_length!r}")
            backend = self._truncating(int(max_length))
        encodings = backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
        out: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
        if return_token_type_ids:
            out["token_type_ids"] = [e.type_ids for e in encodings]
        return {k: v[0] for k, v in out.items()} if single else out

    def _truncating(self, max_length: int) -> Any:
        """A copy of the tokenizer that truncates to max_length (one per length; the shared one is never mutated)."""
        copies = self._truncating_copies
        if max_length not in copies:
            from tokenizers import Tokenizer

            copy = Tokenizer.from_str(self._tokenizer.to_str())
            copy.enable_truncation(max_length, strategy="longest_first")
            copies[max_length] = copy
        return copies[max_length]

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Token strings of ids (used in error messages about label words)."""
        return [self._tokenizer.id_to_token(int(i)) for i in ids]


def tokenizer_record(tokenizer: Any) -> dict[str, Any]:
    """The special ids and flags of an HF tokenizer that the adapter needs, for fsserve.json."""
    record: dict[str, Any] = {name: getattr(tokenizer, name, None) for name in _SPECIAL_IDS}
    record["add_bos_token"] = bool(getattr(tokenizer, "add_bos_token", False))
    return record


def _check_adapter(tokenizer: Any, folder: Path, plain: bool = False) -> None:
    """Refuse to write a bundle whose tokenizer.json does not reproduce the HF tokenizer.

    ``plain``: also check plain-text encoding (pairs, token types, longest-first truncation), which
    a standard fine-tuned model's bundle uses instead of the prompt.
    """
    adapter = BundleTokenizer.from_folder(folder, tokenizer_record(tokenizer))
    for text in _PROBES:
        for special in (False, True):
            want = list(tokenizer(text, add_special_tokens=special)["input_ids"])
            got = adapter(text, add_special_tokens=special)["input_ids"]
            if want != got:
                raise ValueError(f"tokenizer.json encodes {text!r} as {got}, the model's tokenizer as {want}: this tokenizer cannot be bundled")
    if not plain:
        return
    firsts, seconds = list(_PROBES[1:]), list(reversed(_PROBES[1:]))
    for pair in (None, seconds):
        for max_length in (7, 64):
            kwargs = dict(truncation=True, max_length=max_length, return_token_type_ids=True)
            want = tokenizer(firsts, pair, **kwargs)
            got = adapter(firsts, pair, **kwargs)
            want_types = want.get("token_type_ids") or [[0] * len(ids) for ids in want["input_ids"]]
            if [list(x) for x in want["input_ids"]] != got["input_ids"] or [list(x) for x in want_types] != got["token_type_ids"]:
                raise ValueError(f"tokenizer.json encodes text pairs (max_length {max_length}) unlike the model's tokenizer: "
                                 "this fine-tuned model's tokenizer cannot be bundled")


# -- manifest -----------------------------------------------------------------------------
def _manifest_digest(manifest: dict[str, Any]) -> str:
    """Checksum of the manifest's own content, so a corrupted manifest is detected like any file."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def _listed_files(root: Path) -> list[str]:
    """Every file under a bundle folder except the manifest, as sorted POSIX paths."""
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return sorted(f for f in files if f != MANIFEST)


def write_manifest(root: str | Path, info: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file of a filled bundle folder and write manifest.json last."""
    import onnx
    import onnxruntime

    from fsserve import __version__

    root = Path(root)
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "fsserve_version": __version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        **info,
        "files": {name: sha256_file(root / name) for name in _listed_files(root)},
    }
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Check the manifest and the sha256 of every file; return the manifest or raise BundleError naming the file."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path} is missing: {root} is not an fsserve bundle")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is corrupted (not valid JSON: {exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise BundleError(f"{manifest_path} is corrupted (its checksum does not match its content)")
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("format_version") != BUNDLE_VERSION:
        raise BundleError(f"{manifest_path}: format {manifest.get('format')} v{manifest.get('format_version')}; this fsserve reads {BUNDLE_FORMAT} v{BUNDLE_VERSION}")
    files: dict[str, str] = manifest.get("files", {})
    for name, digest in files.items():
        file = root / name
        if not file.is_file():
            raise BundleError(f"bundle file {file} is missing")
        if sha256_file(file) != digest:
            raise BundleError(f"bundle file {file} is corrupted (sha256 does not match the manifest)")
    extra = sorted(set(_listed_files(root)) - set(files))
    if extra:
        raise BundleError(f"bundle file {root / extra[0]} is not listed in the manifest (a bundle is never edited after export)")
    return manifest


# -- writing ------------------------------------------------------------------------------
def write_bundle(
    model: Any,
    directory: str | Path,
    target: str = "onnx",
    quantize: str | None = None,
    fp16: bool = False,
    optimize: bool = True,
    validate: bool = True,
    validation_texts: Sequence[Any] | None = None,
    int8_mode: str = "auto",
    per_channel: bool = False,
    exclude_op_types: Sequence[str] = (),
    int8_nodes: Sequence[str] = (),
    torch_weights: bool = True,
    demos: Any = None,
    atol: float | None = None,
) -> Path:
    """Export, validate and optimise the graph, then write the whole bundle atomically; return its path."""
    from fsserve.exporters import onnx as ox

    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantize {quantize!r}: the only option is 'int8'")
    if quantize and fp16:
        raise ValueError("choose one of quantize='int8' (CPU) and fp16=True (GPU), not both")
    directory = Path(directory)
    if demos is None:
        demos = getattr(model, "demo_index", None)  # a model trained with demonstrations ships its pool
    info: dict[str, Any] = {"model_name": str(getattr(model, "source", None) or model.lm.config.model_type), "target": target, "opset": ox.OPSET}
    with atomic_directory(directory) as tmp, tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}.work.") as work_dir:
        work = Path(work_dir)
        fp32 = work / "fp32.onnx"
        input_names = ox.export_graph(model, fp32)
        info["optimization"] = ox.optimize_graph(fp32, model) if optimize else {"fusions": None}
        if validate:
            info["validation"] = ox.validate_graph(model, fp32, atol=ox.FP32_ATOL if atol is None else atol)
        graph = tmp / ox.GRAPH_FILE
        if quantize or fp16:
            if quantize:
                mode = ox.default_int8_mode(model) if int8_mode == "auto" else int8_mode
                info["quantization"] = ox.quantize_int8(fp32, graph, mode, per_channel, exclude_op_types, int8_nodes)
            else:
                ox.convert_fp16(fp32, graph)
            if validation_texts is not None:
                batches = ox.text_batches(model, validation_texts)
            else:
                batches = [case.batch for case in ox.shape_grid(model) if "right" in case.label]
            measured_on = f"{len(validation_texts)} validation texts" if validation_texts is not None else "random right-padded shape grid"
            info["agreement_with_fp32"] = ox.agreement(fp32, graph, batches) | {"on": measured_on}
            logger.info("%s agreement with fp32: %s", quantize or "fp16", info["agreement_with_fp32"])
        else:
            os.replace(fp32, graph)
        info["precision"] = quantize or ("fp16" if fp16 else "fp32")
        info["graph"] = ox.GRAPH_FILE
        info["inputs"] = input_names
        model.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        _check_adapter(model.tokenizer, tmp / TOKENIZER_DIR, plain=model.method == "finetune")
        config = model.metadata() | {"tokenizer": tokenizer_record(model.tokenizer), "pad_token_id": model.pad_token_id, "inputs": input_names}
        write_json_atomic(tmp / CONFIG, config)
        if torch_weights:
            model.save_pretrained(tmp / TORCH_DIR)
        info["torch"] = TORCH_DIR if torch_weights else None
        if demos is not None:
            demos.save(tmp / DEMOS_DIR)
        info["demos"] = DEMOS_DIR if demos is not None else None
        write_manifest(tmp, info)
    logger.info("wrote bundle %s (%s)", directory, info["precision"])
    return directory


# -- loading ------------------------------------------------------------------------------
def read_bundle_config(path: str | Path) -> dict[str, Any]:
    """The verified bundle's fsserve.json (prompt, labels, tokenizer ids), merged under key ``manifest``."""
    root = Path(path)
    manifest = verify_bundle(root)
    config = json.loads((root / CONFIG).read_text(encoding="utf-8"))
    config["manifest"] = manifest
    return config


def load_bundle_predictor(path: str | Path, backend: str = "onnx", device: str | None = None, batch_size: int = 32, **kwargs: Any) -> Any:
    """Build a Predictor from a verified bundle: onnxruntime without torch, or the bundled torch model."""
    from fsserve.predictor import Predictor

    root = Path(path)
    config = read_bundle_config(root)
    if config.get("ensemble"):  # several prompts in one graph: fsserve.ensemble_predictor encodes each text once per prompt
        from fsserve.ensemble_predictor import load_ensemble_predictor

        return load_ensemble_predictor(root, config, backend=backend, device=device, batch_size=batch_size, **kwargs)
    if backend == "torch":
        if not config["manifest"].get("torch"):
            raise BundleError(f"{root} carries no torch weights: export it with torch_weights=True to load it with backend='torch'")
        from fsserve.modeling import PromptModel

        return Predictor.from_model(PromptModel.from_pretrained(root / TORCH_DIR), device=device, batch_size=batch_size, **kwargs)
    if backend != "onnx":
        raise ValueError(f"unknown backend {backend!r}: use 'onnx' or 'torch'")
    from fsserve.config import PromptConfig
    from fsserve.prompts import Prompt
    from fsserve.runtime.onnx import OnnxBackend

    tokenizer = BundleTokenizer.from_folder(root / TOKENIZER_DIR, config["tokenizer"])
    prompt_config = PromptConfig.from_dict(config["prompt"])
    prompt = Prompt(prompt_config, tokenizer, config["kind"])
    if prompt.label_word_ids != config["label_word_ids"]:
        raise BundleError(f"{root / TOKENIZER_DIR}: label words tokenize to {prompt.label_word_ids}, the graph was exported for {config['label_word_ids']}")
    runner = OnnxBackend(root / config["manifest"]["graph"], device=device, **kwargs)
    encode = prompt.encode
    finetuned = config.get("method") == "finetune"
    if finetuned:  # standard fine-tuning reads the plain text, not the prompt
        from fsserve.plain_inputs import encode_plain

        max_length = int(prompt_config.max_length)
        num_sentences = prompt.template.num_sentences

        def encode(examples: Sequence[Any]) -> list[Any]:
            """Plain-text inputs, as the fine-tuned model was trained on."""
            return encode_plain(tokenizer, examples, num_sentences, max_length, config["kind"])
    if config["manifest"].get("demos"):
        from fsserve.config import DemoConfig
        from fsserve.demo_prompts import demo_encoder

        demo_config = DemoConfig.from_dict((config.get("demos") or {}).get("config") or {})
        encode = demo_encoder(prompt, load_bundle_demos(root), demo_config)
    return Predictor(runner, encode, config["labels"], int(config["pad_token_id"]), prompt_config.regression_range,
                     prompt.template.num_sentences, batch_size, finetune_regression=finetuned and prompt_config.is_regression)


def load_bundle_demos(path: str | Path) -> Any:
    """The bundle's demonstration index (fsserve.demos.DemoIndex), or None when it has none."""
    root = Path(path)
    manifest = verify_bundle(root)
    if not manifest.get("demos"):
        return None
    from fsserve.demos import DemoIndex  # type: ignore[import-not-found]

    return DemoIndex.load(root / manifest["demos"])
