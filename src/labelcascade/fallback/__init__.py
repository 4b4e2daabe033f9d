"""The cheap classifier: a linear SVM over embeddings with calibrated probabilities, retrained as labels arrive."""

from labelcascade.fallback.svm import LinearSVMClassifier, NotFittedError
from labelcascade.fallback.weights import sample_weights

__all__ = ["LinearSVMClassifier", "NotFittedError", "sample_weights"]
