"""labelcascade: text classification with a local LLM that gets cheaper the more it works."""

from labelcascade.classifier import Classifier
from labelcascade.records import Example, Prediction, Route, Source
from labelcascade.session import Session
from labelcascade.task import Label, Task, TaskError

__all__ = ["Classifier", "Session", "Example", "Label", "Prediction", "Route", "Source", "Task", "TaskError"]
__version__ = "0.1.0"
