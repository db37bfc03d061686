"""DemoIndex: LM-BFF's demonstration pool, embedded once with a sentence encoder, one FAISS index per class.

Vectors are L2-normalised, so FAISS's inner product is the cosine similarity LM-BFF ranks by.
Selection returns, for every query, one pool id per class in class order, or with ``per_class=k``
k of each in rounds (column ``r * classes + j`` is class j's r-th pick). ``select`` embeds a batch
of queries in one encoder call; ``select_by_id`` reuses the stored embeddings of pool members, which
is what training needs. A query never gets itself: neither its own pool id nor any pool entry with
the same text. Regression pools are split into classes "0"/"1" at the task's median (LM-BFF's rule,
``fsserve.data.regression_class``) or at an explicit ``threshold``. ``similar`` keeps the top
``filter_rate`` of each class's candidates (LM-BFF: of the pool size / classes; the same for
balanced pools, at least k) and samples k distinct ones from them; ``top1`` takes the k best, best first;
``random`` k distinct ones. ``select`` only reads (CPU FAISS searches may run concurrently); ``add``
must not run beside it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fsserve.data import Example, TaskSpec, get_task, regression_class
from fsserve.demos.encoder import DEFAULT_ENCODER, Query, pair_text, query_encoder, query_text
from fsserve.utils.atomic import atomic_directory, sha256_file, write_json_atomic
from fsserve.utils.device import resolve_device

logger = logging.getLogger(__name__)

MODES = ("top1", "similar", "random")
INDEX_TYPES = ("flat", "ivf", "hnsw")
FORMAT = "fsserve-demo-index"
ENCODER_DIR = "encoder"  # the sentence encoder as ONNX, when the index was saved with one
GPU_MAX_K = 2048  # FAISS GPU indexes refuse k above this; larger searches go to numpy


def _key(text: str) -> str:
    """The form under which two texts count as identical (whitespace folded)."""
    return " ".join(text.split())


class DemoIndex:
    """A labelled pool, its sentence embeddings and one FAISS index per class.

    >>> pool = [Example("A gem.", label="1"), Example("A mess.", label="0"), Example("Superb.", label="1")]
    >>> index = DemoIndex(pool, labels=["0", "1"])  # doctest: +SKIP
    >>> index.select(["Great fun."], mode="top1").tolist()  # doctest: +SKIP
    [[1, 2]]
    """

    def __init__(self, examples: Sequence[Example], labels: Sequence[str] | None = None, *, encoder: str | None = None,
                 index_type: str = "flat", task: str | TaskSpec | None = None, threshold: float | None = None,
                 device: str | None = None, batch_size: int = 64) -> None:
        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown index_type {index_type!r}: choose one of {', '.join(INDEX_TYPES)}")
        if not examples:
            raise ValueError("the demonstration pool is empty")
        self.encoder_name = encoder or DEFAULT_ENCODER
        self.index_type = index_type
        self.task = get_task(task).name if task is not None else None
        self.threshold = None if threshold is None else float(threshold)
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.examples: list[Example] = []
        self._setup(labels, examples)
        present = {self._class_index(ex.label) for ex in examples}  # bad labels fail before the slow embedding
        missing = [c for j, c in enumerate(self.classes) if j not in present]
        if missing:
            raise ValueError(f"the demonstration pool has no example of class(es) {missing}")
        self._embeddings = self.embed([pair_text(ex.text, ex.text_b) for ex in examples])
        self.dim = int(self._embeddings.shape[1])
        self._append(list(examples), self._embeddings, build=True)

    # -- construction and persistence ---------------------------------------------------
    def _setup(self, labels: Sequence[str] | None, examples: Iterable[Example]) -> None:
        """Fix the class list and the empty per-class state."""
        regression = any(isinstance(ex.label, float) for ex in examples)
        if labels is None:
            labels = ["0", "1"] if regression else sorted({str(ex.label) for ex in examples if ex.label is not None})
        self.classes: list[str] = [str(c) for c in labels]
        if regression and sorted(self.classes) != ["0", "1"]:
            raise ValueError(f"a regression pool is split into classes '0' and '1', but labels are {self.classes}")
        self._class_of = np.empty(0, dtype=np.int64)
        self._members: list[np.ndarray] = [np.empty(0, dtype=np.int64) for _ in self.classes]
        self._keys: dict[str, list[int]] = {}
        self._indexes: list[Any] = []
        self._gpu_resources: Any = None
        self._encoder: Any = None  # an OnnxSentenceEncoder when the saved index carries one

    def _class_index(self, label: Any) -> int:
        """Map a label (a class name, or a regression score) to its class position."""
        if label is None:
            raise ValueError("a demonstration needs a label; got an unlabelled example")
        scored = self.task is not None or self.threshold is not None
        if isinstance(label, float) or (scored and isinstance(label, int) and not isinstance(label, bool)):
            if not scored:
                raise ValueError(f"regression label {label} needs task= or threshold= to be put in a class")
            # LM-BFF's demonstration rule: a score at the split point is low ("0").
            label = regression_class(label, self.task) if self.task is not None else ("0" if label <= self.threshold else "1")
        if str(label) not in self.classes:
            raise ValueError(f"label {label!r} is not one of the classes {self.classes}")
        return self.classes.index(str(label))

    def _new_index(self, vectors: np.ndarray) -> Any:
        """Build (and for IVF, train) the index of one class."""
        import faiss

        if self.index_type == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
        elif self.index_type == "ivf" and len(vectors) >= 78:
            # ~39 training points per list keep k-means sane; a smaller class stays exact (flat).
            nlist = min(int(4 * np.sqrt(len(vectors))), len(vectors) // 39)
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = min(nlist, 16)
        else:
            index = faiss.IndexFlatIP(self.dim)
        return self._to_device(index)

    def _to_device(self, index: Any) -> Any:
        """Move an index to the GPU when there is one and this FAISS build can use it (HNSW stays on CPU)."""
        import faiss

        if not self.device.startswith("cuda") or self.index_type == "hnsw":
            return index
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
            logger.info("FAISS has no GPU support here (faiss-cpu); the demonstration index stays on the CPU")
            return index
        if self._gpu_resources is None:
            self._gpu_resources = faiss.StandardGpuResources()
        gpu = int(self.device.split(":")[1]) if ":" in self.device else 0
        return faiss.index_cpu_to_gpu(self._gpu_resources, gpu, index)

    def _append(self, examples: list[Example], vectors: np.ndarray | None, build: bool = False) -> None:
        """Register examples; add their embeddings to the class indexes (None: the indexes already hold them)."""
        classes = np.array([self._class_index(ex.label) for ex in examples], dtype=np.int64)
        start = len(self.examples)
        ids = np.arange(start, start + len(examples), dtype=np.int64)
        for j in range(len(self.classes)):
            rows = ids[classes == j]
            if build:
                self._indexes.append(self._new_index(vectors[rows - start]))
            if vectors is not None and len(rows):
                self._indexes[j].add(np.ascontiguousarray(vectors[rows - start]))
            self._members[j] = np.concatenate([self._members[j], rows])
        self.examples.extend(examples)
        self._class_of = np.concatenate([self._class_of, classes])
        for i, ex in zip(ids.tolist(), examples):
            self._keys.setdefault(_key(pair_text(ex.text, ex.text_b)), []).append(i)

    def add(self, texts: Sequence[str], labels: Sequence[Any], texts_b: Sequence[str | None] | None = None) -> None:
        """Append demonstrations (one encoder call for the new ones only); the next select sees them."""
        if isinstance(texts, str) or len(texts) != len(labels) or (texts_b is not None and len(texts_b) != len(texts)):
            raise ValueError("add() needs lists of texts and labels (and texts_b, if given) of the same length")
        if not len(texts):
            return
        new = [Example(t, None if texts_b is None else texts_b[i], labels[i]) for i, t in enumerate(texts)]
        for ex in new:
            self._class_index(ex.label)  # refuse a bad label before paying for the embedding
        vectors = self.embed([pair_text(ex.text, ex.text_b) for ex in new])
        self._embeddings = np.concatenate([self._embeddings, vectors])
        self._append(new, vectors, build=False)

    def save(self, directory: str | Path, onnx_encoder: bool = False) -> Path:
        """Write pool, embeddings, indexes and a checksummed meta file atomically into ``directory``.

        ``onnx_encoder``: also export the sentence encoder to ONNX (``encoder/``), so the index
        embeds queries without torch once loaded; an encoder that cannot be exported is left out, with a warning.
        """
        import faiss

        with atomic_directory(directory) as tmp:
            pool = {"texts": [ex.text for ex in self.examples], "texts_b": [ex.text_b for ex in self.examples],
                    "labels": [ex.label for ex in self.examples]}
            write_json_atomic(tmp / "pool.json", pool)
            np.save(tmp / "embeddings.npy", self._embeddings, allow_pickle=False)
            for j, index in enumerate(self._indexes):
                cpu = faiss.index_gpu_to_cpu(index) if hasattr(index, "getDevice") else index
                faiss.write_index(cpu, str(tmp / f"index_{j}.faiss"))
            files = ["pool.json", "embeddings.npy"] + [f"index_{j}.faiss" for j in range(len(self.classes))]
            if onnx_encoder:
                from fsserve.demos.onnx_encoder import export_sentence_encoder

                try:
                    export_sentence_encoder(self.encoder_name, tmp / ENCODER_DIR)
                    files += sorted(p.relative_to(tmp).as_posix() for p in (tmp / ENCODER_DIR).rglob("*") if p.is_file())
                except ValueError as exc:
                    logger.warning("the pool is saved without an ONNX encoder (queries will need sentence-transformers): %s", exc)
            meta = {"format": FORMAT, "version": 1, "encoder": self.encoder_name, "dim": self.dim,
                    "size": len(self.examples), "classes": self.classes, "index_type": self.index_type,
                    "task": self.task, "threshold": self.threshold,
                    "sha256": {name: sha256_file(tmp / name) for name in files}}
            write_json_atomic(tmp / "demo_index.json", meta)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, *, encoder: str | None = None, device: str | None = None,
             batch_size: int = 64, num_threads: int | None = None) -> DemoIndex:
        """Load a saved index without re-embedding, refusing it when any file disagrees with its meta (``num_threads``: the ONNX encoder's)."""
        import faiss

        root = Path(directory)
        meta_path = root / "demo_index.json"
        if not meta_path.is_file():
            raise ValueError(f"{root} holds no demonstration index (demo_index.json is missing)")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not a {FORMAT} file")
        if encoder is not None and encoder != meta["encoder"]:
            raise ValueError(f"the pool in {root} was embedded with {meta['encoder']!r}, not {encoder!r}; rebuild it")
        for name, digest in meta["sha256"].items():
            if not (root / name).is_file() or sha256_file(root / name) != digest:
                raise ValueError(f"{root / name} is missing or does not match its sha256 in demo_index.json")
        pool = json.loads((root / "pool.json").read_text(encoding="utf-8"))
        embeddings = np.load(root / "embeddings.npy", allow_pickle=False)
        n = len(pool["texts"])
        if len(pool["texts_b"]) != n or len(pool["labels"]) != n or meta["size"] != n:
            raise ValueError(f"pool.json in {root} has {n} texts but {len(pool['labels'])} labels (meta says {meta['size']})")
        if embeddings.dtype != np.float32 or embeddings.shape != (n, meta["dim"]):
            raise ValueError(f"embeddings {embeddings.dtype}{embeddings.shape} do not match the pool of "
                             f"{len(pool['texts'])} texts and dimension {meta['dim']} in {root}")
        self = cls.__new__(cls)
        self.encoder_name, self.dim, self.index_type = meta["encoder"], int(meta["dim"]), meta["index_type"]
        self.task, self.threshold, self.device, self.batch_size = meta["task"], meta["threshold"], resolve_device(device), int(batch_size)
        examples = [Example(t, b, lab) for t, b, lab in zip(pool["texts"], pool["texts_b"], pool["labels"])]
        self.examples = []
        self._setup(meta["classes"], examples)
        self._embeddings = embeddings
        self._indexes = [faiss.read_index(str(root / f"index_{j}.faiss")) for j in range(len(self.classes))]
        if (root / ENCODER_DIR).is_dir() and not self.device.startswith("cuda"):  # on a GPU the torch encoder is the fast one
            from fsserve.demos.onnx_encoder import OnnxSentenceEncoder

            self._encoder = OnnxSentenceEncoder(root / ENCODER_DIR, num_threads)
            if self._encoder.name != self.encoder_name:
                raise ValueError(f"{root / ENCODER_DIR} holds {self._encoder.name!r}, but the pool was embedded with {self.encoder_name!r}")
        self._append(examples, None)
        for j, index in enumerate(self._indexes):
            members = self._members[j]
            if index.ntotal != len(members) or index.d != self.dim:
                raise ValueError(f"index_{j}.faiss holds {index.ntotal} vectors of dimension {index.d}, but the pool "
                                 f"has {len(members)} of class {self.classes[j]!r} (dimension {self.dim})")
            # Exact and HNSW indexes keep the vectors: their ends must be the stored embeddings.
            if not isinstance(index, faiss.IndexIVF) and len(members):
                for local in (0, len(members) - 1):
                    if not np.allclose(index.reconstruct(local), embeddings[members[local]], atol=1e-6):
                        raise ValueError(f"index_{j}.faiss does not hold the embeddings of its pool in {root}")
            self._indexes[j] = self._to_device(index)
        return self

    # -- embedding and selection ----------------------------------------------------------
    def __len__(self) -> int:
        """Pool size, so callers can size draws and check ids."""
        return len(self.examples)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts in one encoder call, as L2-normalised float32 rows (cosine = inner product)."""
        model = self._encoder if self._encoder is not None else query_encoder(self.encoder_name, self.device)
        dim = getattr(self, "dim", None)
        if dim is not None and model.get_embedding_dimension() != dim:
            raise ValueError(f"encoder {self.encoder_name!r} gives {model.get_embedding_dimension()}-dimensional "
                             f"vectors but the pool was embedded in {dim} dimensions")
        vectors = model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    @property
    def embeddings(self) -> np.ndarray:
        """The pool's embeddings, row i for pool id i (read-only view)."""
        view = self._embeddings.view()
        view.flags.writeable = False
        return view

    def class_of(self, pool_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Class position of each pool id, so callers can check or group selections."""
        return self._class_of[np.asarray(pool_ids, dtype=np.int64)]

    def demos(self, selection: np.ndarray) -> list[list[Example]]:
        """Turn a ``select`` result into the demonstration Examples, one list per query in the selection's order."""
        return [[self.examples[int(i)] for i in row] for row in np.asarray(selection)]

    def select(self, queries: Sequence[Query], mode: str = "top1", filter_rate: float = 0.5,
               rng: np.random.Generator | int | Sequence[np.random.Generator] | None = None, exclude: Sequence[Any] | None = None,
               embeddings: np.ndarray | None = None, per_class: int = 1) -> np.ndarray:
        """Pick ``per_class`` demonstrations per class for each query: a (queries × per_class·classes) array of pool ids.

        ``exclude`` has one entry per query: a pool id, a collection of ids, or None. Pool entries with the
        query's own text are always excluded; ``rng`` may be a list, one generator per query. ``embeddings`` (from :meth:`embed`) lets several draws for
        the same queries (LM-BFF's ``num_sample``) share one encoder call; ``random`` never calls it.
        """
        texts = [query_text(q) for q in queries]
        keys = [_key(t) for t in texts]
        if exclude is not None and len(exclude) != len(keys):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(keys)} queries")
        banned = [_as_ids(None if exclude is None else exclude[i]) for i in range(len(keys))]
        if any(i >= len(self.examples) for b in banned for i in b):
            raise ValueError(f"exclude names a pool id beyond the pool of {len(self.examples)}")
        vectors = embeddings
        if vectors is None and mode != "random" and keys:
            vectors = self.embed(texts)
        elif vectors is not None and np.shape(vectors) != (len(keys), self.dim):
            raise ValueError(f"embeddings must have shape ({len(keys)}, {self.dim}), got {np.shape(vectors)}")
        return self._select(vectors, keys, banned, mode, filter_rate, rng, per_class)

    def select_by_id(self, pool_ids: Sequence[int] | np.ndarray, mode: str = "similar", filter_rate: float = 0.5,
                     rng: np.random.Generator | int | None = None, per_class: int = 1) -> np.ndarray:
        """Select for queries that are pool members (training), from their stored embeddings: no encoder call."""
        ids = np.asarray(pool_ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.examples)):
            raise ValueError(f"pool ids must be in [0, {len(self.examples)}), got {ids.min()}..{ids.max()}")
        keys = [_key(pair_text(self.examples[i].text, self.examples[i].text_b)) for i in ids.tolist()]
        return self._select(self._embeddings[ids], keys, [{i} for i in ids.tolist()], mode, filter_rate, rng, per_class)

    def _select(self, vectors: np.ndarray | None, keys: list[str], banned: list[set[int]], mode: str,
                filter_rate: float, rng: np.random.Generator | int | None, per_class: int = 1) -> np.ndarray:
        """Shared body of the two selection entry points; ``banned`` grows by each query's identical texts."""
        if mode not in MODES:
            raise ValueError(f"unknown selection mode {mode!r}: choose one of {', '.join(MODES)}")
        if not 0.0 < filter_rate <= 1.0:
            raise ValueError(f"filter_rate must be in (0, 1], got {filter_rate}")
        if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
            raise ValueError(f"per_class must be an integer of at least 1, got {per_class!r}")
        rngs = list(rng) if isinstance(rng, (list, tuple)) else None  # one generator per query: draws that ignore the batch
        if rngs is not None and len(rngs) != len(keys):
            raise ValueError(f"got {len(rngs)} random generators for {len(keys)} queries")
        rng = rng if isinstance(rng, np.random.Generator) or rngs is not None else np.random.default_rng(rng)
        n, k = len(self.classes), int(per_class)
        out = np.empty((len(keys), n * k), dtype=np.int64)
        if not keys:
            return out
        banned = [b | set(self._keys.get(key, ())) for b, key in zip(banned, keys)]
        for j, label in enumerate(self.classes):
            members = self._members[j]
            own = [np.array(sorted(i for i in b if self._class_of[i] == j), dtype=np.int64) for b in banned]
            avail = [len(members) - len(o) for o in own]
            if min(avail) < k:
                raise ValueError(f"class {label!r} has {min(avail)} demonstration(s) left once the query itself is "
                                 f"excluded, but per_class={k} needs {k}")
            columns = slice(j, n * k, n)  # class j's picks, one per round
            if mode == "random":
                for q, o in enumerate(own):
                    candidates = np.setdiff1d(members, o, assume_unique=True) if len(o) else members
                    gen = rngs[q] if rngs is not None else rng
                    out[q, columns] = gen.choice(candidates) if k == 1 else gen.choice(candidates, size=k, replace=False)
                continue
            want = [k if mode == "top1" else min(a, max(k, int(a * filter_rate))) for a in avail]
            depth = min(len(members), max(w + len(o) for w, o in zip(want, own)))
            found = self._search(j, vectors, depth)
            for q, (o, w) in enumerate(zip(own, want)):
                row = found[q][found[q] >= 0]
                row = members[row]
                if len(o):
                    row = row[~np.isin(row, o)]
                row = row[:w]
                if len(row) < k:  # an approximate index missed candidates: fall back to exact
                    row = self._exact(j, vectors[q : q + 1], depth)[0]
                    row = members[row][~np.isin(members[row], o)][:w]
                if mode == "top1":
                    out[q, columns] = row[:k]
                else:
                    gen = rngs[q] if rngs is not None else rng
                    out[q, columns] = gen.choice(row) if k == 1 else gen.choice(row, size=k, replace=False)
        return out

    def _search(self, j: int, vectors: np.ndarray, k: int) -> np.ndarray:
        """Local ids of the k best vectors of class j for every query (one FAISS call for the batch)."""
        index = self._indexes[j]
        if hasattr(index, "getDevice") and k > GPU_MAX_K:
            return self._exact(j, vectors, k)
        params = None
        if self.index_type == "hnsw":
            import faiss

            params = faiss.SearchParametersHNSW()  # per call, so concurrent searches never share a setting
            params.efSearch = max(64, k)
        _, local = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k, params=params)
        return local

    def _exact(self, j: int, vectors: np.ndarray, k: int) -> np.ndarray:
        """Exact top-k of class j in numpy (GPU k limit, or an IVF probe that found nothing)."""
        scores = vectors @ self._embeddings[self._members[j]].T
        if k < scores.shape[1]:
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1)


def _as_ids(value: Any) -> set[int]:
    """Normalise one ``exclude`` entry (None, an id, or ids) to a set of ints."""
    if value is None:
        return set()
    if isinstance(value, (int, np.integer)):
        return {int(value)} if value >= 0 else set()
    return {int(v) for v in value if int(v) >= 0}
