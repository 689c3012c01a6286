"""Approximate search with faiss: PQ, IVF-PQ, OPQ, fast-scan, with or without exact re-ranking.

Search-time parameters (`nprobe`, `k_factor`) go in a per-call faiss `SearchParameters`, never on
the shared index object, so concurrent searches with different settings cannot see each other's.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from . import _storage as st
from ._bank import Bank
from ._errors import CorruptBankError, FactoryStringError, InvalidInputError
from ._index_rows import BankRows, IndexRows, MatrixRows
from ._validate import (
    Metric,
    MetricName,
    Queries,
    as_matrix,
    check_k,
    check_k_factor,
    check_metric,
    normalize,
)

TRAIN_SIZE = 100_000
DEFAULT_K_FACTOR = 4.0
# faiss trains and searches in float32: a squared distance between rows of norm up to this
# stays below float32's 3.4e38 ((2 * 2**60)**2 = 2**122); beyond it k-means sees inf and faiss
# aborts the process from inside an OpenMP region, where no exception can be caught.
MAX_FAISS_NORM = 2.0**60
MAX_NBITS = 16  # faiss's product quantizers take at most 16 bits per code
MAX_CENTROID_BYTES = 1 << 30  # 2**nbits * d floats per PQ: allocated when the spec is made
_IVF = re.compile(r"IVF(\d+)")
_PQ = re.compile(r"PQ(\d+)(?:x(\d+))?")


ID_BYTES = 8  # per vector: its id, in the IVF lists or the IDMap


def default_spec(nb: int, d: int, budget_bytes: int | None = None) -> str:
    """The spec used when none is given, from the bank's size nb and width d.

    - PQ with 4-bit fast-scan codes, m = d/2 sub-quantizers (2 dimensions each, 1 byte per 2
      dimensions); m = d when d is odd. Fast-scan keeps the codes in SIMD registers, which is
      the quickest PQ scan faiss has.
    - With `budget_bytes`, the largest m (a divisor of d, at most that) whose codes and ids,
      nb x (m / 2 + 8) bytes, fit the budget; the smallest divisor when none fits.
    - Below 10,000 vectors a flat PQ scan is already well under a millisecond: no IVF.
      From there on an IVF coarse quantizer with nlist ~ sqrt(nb) (a power of two, at most
      nb / 39 so that every centroid gets the 39 training points faiss asks for), searched by
      default with nprobe = nlist / 8: an eighth of the bank is scanned.
    - No `RFlat`: the index holds codes only. The service re-ranks its shortlist (k x
      k_factor) with exact distances from the bank's own rows (`search_proposed`), which buys
      the recall PQ loses without a second float32 copy of the bank in RAM.
    """
    top = d // 2 if d % 2 == 0 else d
    ms = [m for m in range(top, 0, -1) if d % m == 0]
    if budget_bytes is not None:
        fits = [m for m in ms if nb * (m / 2 + ID_BYTES) <= budget_bytes]
        ms = fits or ms[-1:]
    pq = f"PQ{ms[0]}x4fs"
    if nb < 10_000:
        return pq
    nlist = 2 ** round(math.log2(math.sqrt(nb)))
    nlist = max(16, min(nlist, 2 ** int(math.log2(nb // 39))))
    return f"IVF{nlist},{pq}"


def _factory(d: int, spec: str, metric: Metric) -> Any:
    try:
        return faiss.index_factory(d, spec, metric.faiss_metric)
    except RuntimeError as exc:
        msg = str(exc).splitlines()[-1] if str(exc) else repr(exc)
        # faiss's reason, without its C++ signature and source location
        msg = re.sub(r"^Error in .* at \S+:\d+: (Error: '.*' failed: )?", "", msg)
        raise FactoryStringError(f"faiss cannot build {spec!r} for d={d}: {msg}") from exc


def check_spec(
    spec: str,
    d: int,
    metric: MetricName | Metric = "l2",
    nb: int | None = None,
    train_size: int = TRAIN_SIZE,
) -> None:
    """Raise FactoryStringError unless faiss can make an index from `spec` for d, and (given
    the bank size nb) train it on min(nb, train_size) vectors: every k-means in it (the IVF
    lists, 2**nbits centroids per PQ sub-quantizer) needs at least as many training points as
    centroids. The sizes are read from the text before faiss allocates anything."""
    metric = check_metric(metric)
    _check_sizes(spec, d, nb, train_size)
    _factory(d, spec, metric)


def _check_sizes(spec: str, d: int, nb: int | None, train_size: int) -> None:
    """`check_spec`'s checks of the sizes written in the spec (no faiss call)."""
    n_train = None if nb is None else min(nb, train_size)
    for m in _IVF.finditer(spec):
        nlist = int(m.group(1))
        if n_train is not None and nlist > n_train:
            raise FactoryStringError(
                f"{spec!r}: IVF{nlist} needs at least {nlist} training vectors; the bank "
                f"has {nb}" + (f" (train_size={train_size})" if nb and nb > train_size else "")
            )
    for m in _PQ.finditer(spec):
        nbits = int(m.group(2) or 8)
        if not 1 <= nbits <= MAX_NBITS:
            raise FactoryStringError(f"{spec!r}: PQ codes of {nbits} bits; faiss takes 1 to 16")
        if (1 << nbits) * d * 4 > MAX_CENTROID_BYTES:
            raise FactoryStringError(
                f"{spec!r}: 2**{nbits} centroids of d={d} take {(1 << nbits) * d * 4} bytes; "
                f"at most {MAX_CENTROID_BYTES}"
            )
        if n_train is not None and (1 << nbits) > n_train:
            raise FactoryStringError(
                f"{spec!r}: {nbits}-bit PQ codes need at least {1 << nbits} training vectors; "
                f"the bank has {nb}"
            )


def check_trainable(x: np.ndarray) -> None:
    """Refuse rows faiss's float32 arithmetic cannot train on (InvalidInputError)."""
    if not len(x):
        return
    top = float(np.sqrt(np.max(np.einsum("ij,ij->i", x, x, dtype=np.float64))))
    if top > MAX_FAISS_NORM:
        raise InvalidInputError(
            f"vectors of norm up to {top:.3g}: faiss trains in float32, whose squared "
            f"distances overflow beyond norm {MAX_FAISS_NORM:.3g}; scale the bank down or "
            "search it exactly"
        )


def _find(index: Any, kind: type) -> Any:
    """The first index of type `kind` in the wrapping chain (IDMap, PreTransform, Refine)."""
    index = faiss.downcast_index(index)
    while index is not None:
        if isinstance(index, kind):
            return index
        inner = getattr(index, "index", None) or getattr(index, "base_index", None)
        index = None if inner is None else faiss.downcast_index(inner)
    return None


def _search_params(index: Any, nprobe: int | None, k_factor: float | None, keep: list[Any]) -> Any:
    """Nested faiss SearchParameters mirroring the index's structure; `keep` holds every
    object so that the C++ side never points at a collected Python object."""
    index = faiss.downcast_index(index)
    params: Any = None
    if isinstance(index, faiss.IndexIDMap):
        return _search_params(index.index, nprobe, k_factor, keep)  # IDMap passes params down
    if isinstance(index, faiss.IndexRefine):
        params = faiss.IndexRefineSearchParameters()
        if k_factor is not None:
            params.k_factor = float(k_factor)
        base = _search_params(index.base_index, nprobe, k_factor, keep)
        if base is not None:
            params.base_index_params = base
    elif isinstance(index, faiss.IndexPreTransform):
        inner = _search_params(index.index, nprobe, k_factor, keep)
        if inner is not None:
            params = faiss.SearchParametersPreTransform()
            params.index_params = inner
    elif faiss.try_extract_index_ivf(index) is not None and nprobe is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = int(nprobe)
    if params is not None:
        keep.append(params)
    return params


class ApproxIndex:
    """A faiss index from an `index_factory` spec, holding the bank's ids.

    Build with `ApproxIndex.build`; search with per-call `nprobe` / `k_factor` (defaults set at
    build time). Results: D (nq, k) float32 (l2: squared distances, ip/cosine: similarities),
    I (nq, k) int64 ids, -1 where the probed lists held fewer than k vectors.
    """

    def __init__(
        self, index: Any, spec: str, metric: MetricName | Metric, nprobe: int, k_factor: float
    ) -> None:
        self._metric = check_metric(metric)
        self.index, self.spec, self.metric = index, spec, self._metric.name
        self.nprobe, self.k_factor = nprobe, float(k_factor)
        self.meta: dict[str, Any] = {}  # caller's notes, saved with the index
        self._nbytes: int | None = None

    @property
    def d(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def has_refine(self) -> bool:
        """Whether `k_factor` applies: the index re-ranks a k x k_factor shortlist."""
        return _find(self.index, faiss.IndexRefine) is not None

    @property
    def nlist(self) -> int | None:
        ivf = faiss.try_extract_index_ivf(self.index)
        return None if ivf is None else int(ivf.nlist)

    @classmethod
    def build(
        cls,
        xb: Any,
        ids: Any = None,
        metric: MetricName | Metric | None = None,
        spec: str | None = None,
        train_size: int = TRAIN_SIZE,
        seed: int = 0,
        budget_bytes: int | None = None,
    ) -> ApproxIndex:
        """Train on a seeded sample of at most `train_size` rows, then add every row with its
        id, block by block.

        xb: a matrix (nb, d) with `ids` (default 0..nb-1) and `metric` (default l2; under
        cosine the rows are normalised first), or a `Bank`, whose live rows, ids and metric
        are taken as stored and read from its segments where they lie: the build then holds
        the sample and one block, never the whole bank. `budget_bytes` bounds the default
        spec's memory (`default_spec`)."""
        if isinstance(xb, Bank):
            if ids is not None:
                raise InvalidInputError("a bank brings its own ids; give ids only with a matrix")
            if metric is not None and check_metric(metric).name != xb.metric:
                raise InvalidInputError(f"the bank's metric is {xb.metric}, not {metric}")
            src: IndexRows = BankRows(xb._state)
            metric = xb._metric
        else:
            metric = check_metric(metric or "l2")
            x = as_matrix(xb, "xb")
            if metric.unit:
                x = normalize(x, "xb")
            xn = x.cpu().numpy()
            ids_a = np.arange(len(xn), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
            if ids_a.shape != (len(xn),):
                raise InvalidInputError(f"ids of shape {ids_a.shape} for {len(xn)} vectors")
            src = MatrixRows(xn, ids_a)
        return cls._build(src, metric, spec, train_size, seed, budget_bytes)

    @classmethod
    def _build(
        cls,
        src: IndexRows,
        metric: Metric,
        spec: str | None,
        train_size: int,
        seed: int,
        budget_bytes: int | None,
    ) -> ApproxIndex:
        nb, d = src.shape
        if nb == 0:
            raise InvalidInputError("cannot build an index on no vectors")
        spec = spec or default_spec(nb, d, budget_bytes)
        _check_sizes(spec, d, nb, train_size)
        index = _factory(d, spec, metric)  # faiss's own parse: FactoryStringError
        rows = np.arange(nb)
        if nb > train_size:
            rows = np.sort(np.random.default_rng(seed).choice(nb, train_size, replace=False))
        sample = src.sample(rows)
        check_trainable(sample)
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise FactoryStringError(
                f"cannot train {spec!r} on {len(sample)} vectors: {exc}"
            ) from exc
        del sample
        ivf = faiss.try_extract_index_ivf(index)
        # An IVF index keeps each vector's id in its lists; any other needs an IDMap beside it
        # (8 more bytes a vector). faiss's Refine takes no ids of its own either.
        own_ids = ivf is not None and _find(index, faiss.IndexRefine) is None
        target = index if own_ids else faiss.IndexIDMap(index)
        for x, block_ids in src.blocks():
            check_trainable(x)
            target.add_with_ids(x, block_ids)
        nprobe = 1 if ivf is None else max(1, min(ivf.nlist // 8, 128))
        return cls(target, spec, metric, nprobe, DEFAULT_K_FACTOR)

    def search(
        self, xq: Any, k: int, nprobe: int | None = None, k_factor: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """xq (nq, d) (or validated `Queries`) -> (D, I), each (nq, k)."""
        if isinstance(xq, Queries):
            x = xq.trusted_by(self.d, self.metric)
        else:
            x = as_matrix(xq, "xq", self.d)
            if self._metric.unit:
                x = normalize(x, "xq")
        k = check_k(k, self.ntotal)
        nprobe = self.nprobe if nprobe is None else nprobe
        k_factor = self.k_factor if k_factor is None else k_factor
        if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or nprobe < 1:
            raise InvalidInputError(f"nprobe must be an integer >= 1; got {nprobe!r}")
        k_factor = check_k_factor(k_factor)
        keep: list[Any] = []
        params = _search_params(self.index, nprobe, k_factor, keep)
        D, I = self.index.search(np.ascontiguousarray(x.cpu().numpy()), k, params=params)
        return D, I

    # -- persistence: the index bytes and a JSON sidecar, both written atomically ---------------

    @property
    def nbytes(self) -> int:
        """Bytes the index holds (its serialised size: codes, ids, centroids, any RFlat copy),
        counted once by serialising it to a counter, not to a buffer."""
        if self._nbytes is None:
            n = 0

            def count(b: bytes) -> None:
                nonlocal n
                n += len(b)

            _write_index(self.index, count)
            self._nbytes = n
        return self._nbytes

    def save(self, path: str | Path) -> None:
        """The index file, streamed through faiss's writer (no copy of it in memory), and its
        JSON sidecar, each written atomically."""
        p = Path(path)
        sha = st.write_with(p, lambda f: _write_index(self.index, f.write))
        self._nbytes = p.stat().st_size
        meta = {
            "spec": self.spec,
            "metric": self.metric,
            "nprobe": self.nprobe,
            "k_factor": self.k_factor,
            "sha256": sha,
            "d": self.d,
            "ntotal": self.ntotal,
            "bytes": self._nbytes,
            "meta": self.meta,
        }
        st.write_bytes(p.with_suffix(p.suffix + ".json"), json.dumps(meta).encode())

    @classmethod
    def load(cls, path: str | Path) -> ApproxIndex:
        p = Path(path)
        try:
            meta = json.loads(p.with_suffix(p.suffix + ".json").read_bytes())
            if st.sha256_file(p) != meta["sha256"]:
                raise CorruptBankError(f"{p.name}: checksum mismatch (index altered or truncated)")
            index = faiss.read_index(str(p))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CorruptBankError(f"{p.name}: cannot load index ({exc})") from exc
        out = cls(index, meta["spec"], meta["metric"], int(meta["nprobe"]), float(meta["k_factor"]))
        out.meta = dict(meta.get("meta", {}))
        out._nbytes = p.stat().st_size
        return out


def _write_index(index: Any, write: Callable[[bytes], Any]) -> None:
    writer = faiss.PyCallbackIOWriter(write)  # type: ignore[attr-defined]
    faiss.write_index(index, writer)
    del writer  # its destructor writes what it still buffers
