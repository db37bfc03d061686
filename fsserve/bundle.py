"""The on-disk bundle: a validated ONNX graph, tokenizer, prompt and manifest, saved atomically and loaded verified.

Layout (every file is listed in ``manifest.json`` with its sha256)::

    manifest.json      format version, fsserve/onnx/onnxruntime/opset versions, model name, checksums
    model.onnx         the label-logits graph (fp32, int8 or fp16 as the manifest's ``precision`` says)
    fsserve.json       PromptModel.metadata(): prompt (template, label words, max length, truncation),
                       labels, label word ids, kind, plus the tokenizer's special ids and graph inputs
    tokenizer/         the tokenizer files (tokenizer.json is what the torch-free backend reads)
    torch/             optional (``torch_weights=True``, ``--with-torch``): the saved PromptModel, for ``backend="torch"``
    demos/             optional extension point: the demonstration pool and FAISS index. Pass any object
                       with ``save(directory)`` (fsserve.demos.DemoIndex) as ``demos=`` to the export;
                       the manifest then records ``"demos": "demos"`` and
                       the predictor loads it with ``DemoIndex.load(bundle / "demos")``. Its files are checksummed like all others.

The bundle is written (by :mod:`fsserve.exporters.bundle`) into a temporary sibling folder and
renamed into place, so an interrupted export leaves the destination as it was. Loading refuses a
bundle whose manifest, or any file, fails its checksum, naming the file; files the manifest does
not list are refused too.

This module is the bundle's format and its torch-free reader: it never imports torch, a model or an
exporter. Building a Predictor from a bundle (onnx or torch) is :mod:`fsserve.predictor`'s job.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fsserve.utils.atomic import sha256_file, write_json_atomic

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "fsserve-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "fsserve.json"
TOKENIZER_DIR = "tokenizer"
TORCH_DIR = "torch"
DEMOS_DIR = "demos"
_SPECIAL_IDS = ("mask_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id")


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


# -- loading ------------------------------------------------------------------------------
def read_bundle_config(path: str | Path) -> dict[str, Any]:
    """The verified bundle's fsserve.json (prompt, labels, tokenizer ids), merged under key ``manifest``."""
    root = Path(path)
    manifest = verify_bundle(root)
    config = json.loads((root / CONFIG).read_text(encoding="utf-8"))
    config["manifest"] = manifest
    return config
