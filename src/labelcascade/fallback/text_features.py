"""The sparse tier: TF-IDF n-grams of the texts themselves, appended to the embedding vectors at a small weight.

Why: a sentence embedding blurs some of the words a label hangs on (trec's question words "who", "how many";
csldcp's domain terms); the same SVM over the vectors plus weighted TF-IDF rows sees them. Measured on the frozen
bodies it helps there and costs up to half a point elsewhere, and a large weight drowns the vectors; on the tuned
bodies it adds nothing measurable (BENCHMARKS.md, "Sparse tier"). So the weight is chosen per task by
cross-validation on the labelled texts (`choose_weight`), and 0 (no TF-IDF) wins every tie.

The n-grams are words and word pairs, or characters 1-3 long for texts written without spaces between words
(Chinese, Japanese), where splitting on spaces finds no words. The vectorizer is fitted on the training texts only
and kept as plain arrays (its vocabulary and idf), so a saved model never needs pickle.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.model_selection import StratifiedKFold, train_test_split

from labelcascade.packed_texts import packed_texts, unpacked_texts

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5)  # 1 and more lost 5-20 points on multilingual-e5-small in the measurement
CV_FOLDS = 4
CV_MIN_PER_LABEL = 4  # fewer labelled texts per label and fold accuracy is noise: no TF-IDF
CV_MAX_TEXTS = 1000  # a retrain on many stored examples chooses on a stratified sample of them
MAX_NGRAMS = 20_000  # the most frequent; keeps a model with many labels small (csldcp: 117k character n-grams, and
#                      the same accuracy with 10k-50k of them, BENCHMARKS.md "Sparse tier")
_SPACELESS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LETTER = re.compile(r"[^\W\d_]")


class NoNgrams(ValueError):
    """Texts that hold no n-gram to count (only one-letter words, symbols or emoji)."""


def analyzer_for(texts: Sequence[str]) -> str:
    """'char' when most letters of the texts belong to scripts written without spaces between words, else 'word'."""
    sample = "".join(texts[:500])
    letters = len(_LETTER.findall(sample))
    return "char" if letters and len(_SPACELESS.findall(sample)) / letters > 0.5 else "word"


class TextNgrams:
    """TF-IDF rows (L2-normalised, sublinear tf) of word 1-2-grams or character 1-3-grams, fitted on some texts."""

    def __init__(self, analyzer: str = "word"):
        if analyzer not in ("word", "char"):
            raise ValueError(f"analyzer must be 'word' or 'char', got {analyzer!r}")
        self.analyzer = analyzer

    def _vectorizer(self, vocabulary: dict[str, int] | None = None) -> TfidfVectorizer:
        ngrams = (1, 3) if self.analyzer == "char" else (1, 2)
        return TfidfVectorizer(analyzer=self.analyzer, ngram_range=ngrams, sublinear_tf=True, vocabulary=vocabulary,
                               max_features=None if vocabulary else MAX_NGRAMS, dtype=np.float32)

    def fit(self, texts: Sequence[str]) -> TextNgrams:
        """NoNgrams when the texts hold no n-gram at all."""
        try:
            self.vectorizer_ = self._vectorizer().fit(list(texts))
        except ValueError as error:
            if "empty vocabulary" not in str(error):
                raise
            raise NoNgrams("the texts hold no word or character n-grams for TF-IDF features; use text_features=0") from None
        self.terms_ = self.vectorizer_.get_feature_names_out().tolist()  # it sorts the vocabulary at each call
        self._digest = None
        return self

    def transform(self, texts: Sequence[str]) -> sparse.csr_matrix:
        """The texts' rows: what `vectorizer_.transform` gives (a test checks it), computed here from its analyzer,
        vocabulary and idf because its own input checks cost 0.37 ms per call, a tenth of answering one text."""
        analyze, vocabulary, idf = self.vectorizer_.build_analyzer(), self.vectorizer_.vocabulary_, self.vectorizer_.idf_
        indptr, indices, data = [0], [], []
        for text in texts:
            counts = Counter(column for column in map(vocabulary.get, analyze(text)) if column is not None)
            weights = [(1.0 + math.log(count)) * idf[column] for column, count in counts.items()]
            norm = math.sqrt(sum(weight * weight for weight in weights)) or 1.0
            indices.extend(counts)
            data.extend(weight / norm for weight in weights)
            indptr.append(len(indices))
        return sparse.csr_matrix((np.array(data, dtype=np.float32), np.array(indices, dtype=np.int32), indptr),
                                 shape=(len(indptr) - 1, len(vocabulary)))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """What `from_arrays` rebuilds it from: the n-grams (`terms_`, in column order; `packed_texts`) and their
        idf."""
        data, ends = packed_texts(self.terms_)
        return {"ngram_bytes": data, "ngram_ends": ends, "ngram_idf": self.vectorizer_.idf_}

    def digest(self) -> bytes:
        """The sha256 of the analyzer and of what `to_arrays` gives, computed once per fit: the fallback's
        fingerprint, which the answer cache asks for at every batch, would otherwise pack the n-grams every time."""
        if getattr(self, "_digest", None) is None:
            digest = hashlib.sha256(self.analyzer.encode())
            for array in self.to_arrays().values():
                digest.update(np.ascontiguousarray(array).tobytes())
            self._digest = digest.digest()
        return self._digest

    @classmethod
    def from_arrays(cls, analyzer: str, data: np.ndarray, ends: np.ndarray, idf: np.ndarray) -> TextNgrams:
        terms = unpacked_texts(data, ends)
        if idf.shape != (len(terms),) or len(set(terms)) != len(terms):
            raise ValueError(f"{len(terms)} distinct n-grams expected with one idf each")
        ngrams = cls(analyzer)
        ngrams.vectorizer_ = ngrams._vectorizer({term: i for i, term in enumerate(terms)})
        ngrams.vectorizer_.idf_ = idf.astype(np.float32)  # the dtype fit gives it: the same rows to the last bit
        ngrams.terms_ = terms
        return ngrams


def appended(X: np.ndarray, ngram_rows: sparse.spmatrix, weight: float) -> sparse.csr_matrix | np.ndarray:
    """The vectors with `weight` x each text's TF-IDF row appended (the vectors alone at weight 0): what the SVM is
    fitted on."""
    if not weight:
        return X
    return sparse.hstack([sparse.csr_matrix(X), weight * ngram_rows], format="csr")


def choose_weight(
    X: np.ndarray,
    texts: Sequence[str],
    y_index: np.ndarray,
    sample_weight: np.ndarray,
    fit: Callable[[sparse.spmatrix | np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    *,
    random_state: int = 0,
) -> float:
    """The weight in WEIGHTS whose SVM (`fit(features, y_index, sample_weight) -> coef, intercept`) classified the
    most held-out labelled texts right in CV_FOLDS-fold cross-validation (each fold's TF-IDF fitted on its own
    training texts; accuracy weighted by `sample_weight`); the smallest weight on a tie, so TF-IDF is added only
    where it measurably helps. 0 when some label has fewer than CV_MIN_PER_LABEL texts."""
    counts = np.bincount(y_index)
    if len(counts) < 2 or counts.min() < CV_MIN_PER_LABEL:
        return 0.0
    rows = np.arange(len(texts))
    if len(rows) > CV_MAX_TEXTS:
        rows, _ = train_test_split(rows, train_size=CV_MAX_TEXTS, stratify=y_index, random_state=random_state)
        if np.bincount(y_index[rows], minlength=len(counts)).min() < CV_MIN_PER_LABEL:
            return 0.0
    analyzer = analyzer_for(texts)
    right = dict.fromkeys(WEIGHTS, 0.0)
    try:
        _held_out_right(X, texts, y_index, sample_weight, fit, rows, analyzer, right, random_state)
    except NoNgrams:  # a fold's texts hold none: there is nothing for TF-IDF to add
        return 0.0
    best = max(right.values())
    return min(weight for weight in WEIGHTS if right[weight] >= best - 1e-9)


def _held_out_right(X, texts, y_index, sample_weight, fit, rows, analyzer, right, random_state) -> None:
    """Add to `right[weight]` the (weighted) held-out texts each weight's SVM classified right, fold by fold."""
    folds = StratifiedKFold(CV_FOLDS, shuffle=True, random_state=random_state).split(rows, y_index[rows])
    for train, test in folds:
        train, test = rows[train], rows[test]
        ngrams = TextNgrams(analyzer).fit([texts[i] for i in train])
        train_ngrams, test_ngrams = ngrams.transform([texts[i] for i in train]), ngrams.transform([texts[i] for i in test])
        for weight in WEIGHTS:
            coef, intercept = fit(appended(X[train], train_ngrams, weight), y_index[train], sample_weight[train])
            scores = np.asarray(appended(X[test], test_ngrams, weight) @ coef.T) + intercept
            predicted = scores.argmax(axis=1) if scores.shape[1] > 1 else (scores[:, 0] > 0).astype(int)
            right[weight] += float(sample_weight[test][predicted == y_index[test]].sum())
