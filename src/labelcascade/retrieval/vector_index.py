"""The vector index: FAISS over the example store's vectors, a search structure and nothing more.

The example database (store.py) holds every vector, so this index can always be rebuilt from it; it is only kept
because rebuilding costs time. Vectors are L2-normalised and searched by inner product, so scores are cosine
similarities. Ids are the database's example ids.

Its structure follows the number of examples: exact (`flat`) search, or approximate (`ivf`) for large stores, where
an IVF index is trained for a target recall of its own stored vectors and retrained once the store has grown past
what its lists were made for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import faiss
import numpy as np

INDEX_KINDS = ("flat", "ivf", "auto")

# "auto" stores switch from exact to approximate search at this many examples: the smallest size bench/store.py
# measured at which exact single-query search takes more than 2 ms (BENCHMARKS.md, "Measurements behind the code").
APPROX_INDEX_MIN_SIZE = 50_000

# An IVF index is trained for a target recall@8 of its own stored vectors (leave-one-out, against exact search).
IVF_TARGET_RECALL = 0.95
IVF_CALIBRATION_K = 8
IVF_CALIBRATION_QUERIES = 200
# k-means settings for the IVF coarse quantizer: lighter than FAISS's defaults (256 points per centroid, 25
# iterations), which train several times slower; the nprobe calibration makes up for the coarser clustering.
IVF_TRAIN_POINTS_PER_CENTROID = 64
IVF_TRAIN_ITERATIONS = 10
IVF_MIN_POINTS_PER_CENTROID = 39  # below this FAISS warns that k-means has too little data

Hits = list[list[tuple[int, float]]]  # per query, (id, score) pairs, best first


class VectorIndex:
    """A FAISS index of `dim`-dimensional unit vectors by id, of the structure `kind` asks for at its size."""

    def __init__(self, index: faiss.Index, *, kind: str):
        self.faiss = index
        self.kind = kind

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, *, dim: int, kind: str) -> VectorIndex:
        """An index of these vectors, of the structure that suits their number."""
        if structure_for(kind, len(ids)) == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        else:
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, _ivf_list_count(len(ids)), faiss.METRIC_INNER_PRODUCT)
            index.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_CENTROID
            index.cp.niter = IVF_TRAIN_ITERATIONS
            index.train(vectors)
        if len(ids):
            index.add_with_ids(vectors, ids)
        if isinstance(index, faiss.IndexIVFFlat):
            index.nprobe = _calibrated_nprobe(index, vectors)
        return cls(index, kind=kind)

    @classmethod
    def from_bytes(cls, content: bytes, *, kind: str) -> VectorIndex:
        """An index written by `to_bytes`; RuntimeError if FAISS cannot read it."""
        return cls(faiss.deserialize_index(np.frombuffer(content, dtype=np.uint8)), kind=kind)

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self.faiss).tobytes()

    def fits(self, size: int, dim: int) -> bool:
        """Whether this is the right structure for `size` examples of `dim` dimensions (not whether it holds the
        right ids)."""
        if self.faiss.d != dim:
            return False
        if structure_for(self.kind, size) == "flat":
            return isinstance(self.faiss, faiss.IndexIDMap2)
        # An IVF index trained when the store was a quarter of its size has half the lists it should: retrain.
        return isinstance(self.faiss, faiss.IndexIVFFlat) and _ivf_list_count(size) < 2 * self.faiss.nlist

    def ids(self) -> np.ndarray:
        """Every id the index holds, sorted."""
        index = self.faiss
        if isinstance(index, faiss.IndexIDMap2):
            return np.sort(faiss.vector_to_array(index.id_map))
        lists = index.invlists
        return np.sort(np.concatenate(
            [np.zeros(0, np.int64)]
            + [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(index.nlist)]
        ))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.faiss.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        self.faiss.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64)))

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> Hits:
        """Up to `k` (id, score) pairs per query, best first, among the `allowed` ids (None: all)."""
        with _threads_for(len(queries)):
            scores, ids = self.faiss.search(queries, k, params=self._search_parameters(allowed))
        # FAISS pads answers shorter than k with id -1.
        return [
            [(int(i), float(s)) for i, s in zip(id_row, score_row) if i >= 0] for id_row, score_row in zip(ids, scores)
        ]

    def balanced_search(
        self, queries: np.ndarray, k: int, by_label: dict[str, np.ndarray], allowed: np.ndarray | None
    ) -> Hits:
        """`search` spread over the labels: each gets up to ceil(k / labels) of its best, dealt round by round,
        and the best of the rest fill any room left."""
        quota = math.ceil(k / len(by_label))
        per_label = [self.search(queries, quota, ids) for ids in by_label.values()]
        overall = self.search(queries, k, allowed)
        balanced = []
        for query in range(len(queries)):
            chosen: dict[int, float] = {}
            # Deal in rounds, every label's best first, then every label's second best, and so on, so that when
            # the quotas add up to more than k the cut falls on the labels' weakest examples, not on whole labels.
            for depth in range(quota):
                round_hits = [hits[query][depth] for hits in per_label if len(hits[query]) > depth]
                for example_id, score in _best(round_hits, len(round_hits)):
                    if len(chosen) < k:
                        chosen.setdefault(example_id, score)
            # Labels with fewer examples than their quota leave room: fill it with the best of the rest.
            for example_id, score in overall[query]:
                if len(chosen) == k:
                    break
                chosen.setdefault(example_id, score)
            balanced.append(_best(chosen.items(), k))
        return balanced

    def _search_parameters(self, allowed: np.ndarray | None) -> faiss.SearchParameters | None:
        selector = None if allowed is None else faiss.IDSelectorBatch(allowed)
        index = self.faiss
        if isinstance(index, faiss.IndexIVFFlat):
            # A filter that keeps a fraction f of the examples leaves f of the probed candidates; probing 1/f times
            # more lists keeps the candidate count, and so the recall, where calibration put it.
            nprobe = index.nprobe
            if allowed is not None:
                nprobe = min(index.nlist, math.ceil(nprobe * index.ntotal / len(allowed)))
            return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        return None if selector is None else faiss.SearchParameters(sel=selector)


def structure_for(kind: str, size: int) -> str:
    """Which structure suits `size` examples under `kind`; an IVF index needs vectors to train on, so an empty
    store is flat."""
    if size == 0 or kind == "flat":
        return "flat"
    if kind == "auto" and size < APPROX_INDEX_MIN_SIZE:
        return "flat"
    return "ivf"


def _best(hits: Iterable[tuple[int, float]], k: int) -> list[tuple[int, float]]:
    """The `k` highest-scoring (id, score) pairs, best first; ties go to the older example."""
    return sorted(hits, key=lambda hit: (-hit[1], hit[0]))[:k]


def _ivf_list_count(size: int) -> int:
    """About 4 * sqrt(size) lists, but few enough that k-means gets enough points for each."""
    return max(1, min(round(4 * math.sqrt(size)), size // IVF_MIN_POINTS_PER_CENTROID))


def _calibrated_nprobe(index: faiss.IndexIVFFlat, vectors: np.ndarray) -> int:
    """The fewest lists to probe for IVF_TARGET_RECALL of the exact top-k, measured on a sample of stored vectors.

    Each sampled vector stands in for a new text that resembles stored ones: it is a query, with itself left out
    of the answer. IVF compares the query with every vector in the lists it probes, so a true neighbour is found
    exactly when its list is among the `nprobe` lists closest to the query: the list's rank in that order is the
    nprobe the neighbour needs, and one pass over those ranks gives the recall of every nprobe at once.
    """
    rng = np.random.default_rng(0)
    sample = rng.choice(len(vectors), size=min(IVF_CALIBRATION_QUERIES, len(vectors)), replace=False)
    queries = vectors[sample]
    exact = faiss.IndexFlatIP(index.d)
    exact.add(vectors)
    _, positions = exact.search(queries, min(IVF_CALIBRATION_K + 1, len(vectors)))
    neighbours = [[p for p in row if p != own][:IVF_CALIBRATION_K] for row, own in zip(positions, sample)]
    if not any(neighbours):
        return 1
    _, lists_by_closeness = index.quantizer.search(queries, index.nlist)
    list_rank = np.empty_like(lists_by_closeness)
    np.put_along_axis(list_rank, lists_by_closeness, np.arange(index.nlist)[None, :], axis=1)
    _, home_list = index.quantizer.search(vectors[np.concatenate(neighbours)], 1)
    query_of_neighbour = np.repeat(np.arange(len(queries)), [len(row) for row in neighbours])
    nprobe_needed = np.sort(list_rank[query_of_neighbour, home_list[:, 0]] + 1)
    return int(nprobe_needed[math.ceil(IVF_TARGET_RECALL * len(nprobe_needed)) - 1])


@contextmanager
def _threads_for(query_count: int) -> Iterator[None]:
    """Search one query on one thread, which was faster than two; from two queries on, the threads pay off
    (BENCHMARKS.md, "Measurements behind the code")."""
    if query_count != 1:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
