"""Evaluation reports: how well a session answers a labelled test set, as numbers, markdown and plots.

    report = evaluate(session, texts, labels, "eval-report")
    report.accuracy, report.macro_f1, report.llm_share, report.report_md

`evaluate` classifies the texts once, through the whole cascade, and measures the answers: accuracy, macro-F1,
per-label precision/recall/F1, answers and accuracy by route, abstentions, the share of texts sent to the LLM,
the coverage/accuracy table over the answers' confidence, and how reliable that confidence is. It writes
`report.md` and three plots beside it (`confusion.png`, `reliability.png`, `llm_share.png`).

Multi-label tasks are measured on indicator matrices: accuracy is exact match (every label of a text right),
per-label scores are those of each label's yes/no decision. A confusion matrix between labels means nothing when a
text has several, so `confusion.png` shows each label's true positives, false negatives and false positives; the
reliability diagram is over the yes/no decisions (confidence of a decision: p if the label was answered, else 1-p),
because the confidence of a whole multi-label answer (its least sure label) is not the probability that the
answer is exactly right.

What the LLM buys (`llm_share.png`) comes from this one run, with no extra LLM calls: a text the cascade sent to the
LLM has both its final answer and its fallback's answer, a text it did not send has only the fallback's. So for
every accept threshold t up to the one in force, the texts whose fallback certainty is under t (all of them sent in
this run) take their final answer and the others the fallback's: exactly what the cascade would have answered with
threshold t. The curve runs from no text sent (the fallback alone) to the share this run sent; sending more would
need LLM answers this run never asked for, so the plot shows nothing there rather than a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import BaseModel, Field
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
)

from labelcascade.agent.calibration import TABLE_THRESHOLDS, CoverageRow, coverage_table, number_text
from labelcascade.atomic_file import replace_atomically
from labelcascade.records import Prediction, Route

from labelcascade.session import LLMBar

if TYPE_CHECKING:
    from labelcascade.session import Session

NO_LABEL = "(none)"  # the answer of an abstention, and the truth of a text that has no label
RELIABILITY_BINS = 10
MAX_TICK_LABELS = 100  # past this many labels a plot's tick labels overlap: they are hidden (see the per-label table)
MAX_CELL_VALUES = 20  # confusion matrices up to this many labels print the count in every cell


class LabelScores(BaseModel):
    label: str
    precision: float
    recall: float
    f1: float
    support: int = Field(description="Test texts that have this label.")


class RouteScores(BaseModel):
    route: Route
    answers: int
    accuracy: float | None = Field(description="Accuracy of the answers given by this route (None when it gave none).")


class SharePoint(BaseModel):
    """One point of `llm_share.png`: the cascade with this accept threshold, replayed from the run's answers."""

    accept_threshold: float
    llm_share: float
    accuracy: float


class EvalReport(BaseModel):
    """What `evaluate` measured and where it wrote it."""

    title: str
    texts: int
    multi_label: bool
    engine: str | None = Field(description="The LLM engine's spec; None when the fallback answered alone.")
    accept_threshold: float
    accuracy: float = Field(description="Share of texts answered right (multi-label: every label right).")
    macro_f1: float | None = Field(description="Mean F1 over the labels that occur in the truth or the answers.")
    fallback_accuracy: float = Field(description="Accuracy the fallback alone would have had on these texts.")
    llm_share: float = Field(description="Share of texts sent to the LLM (those it failed on included).")
    abstained: int
    out_of_scope: int = Field(0, description="Test texts with no label (out of scope: the right answer is none).")
    out_of_scope_recall: float | None = Field(
        None, description="Share of the texts with no label that were answered none (None when there are none).")
    in_scope_accuracy: float | None = Field(
        None, description="Accuracy on the texts that have a label (None when every text has one: see accuracy).")
    in_scope_rejected: float | None = Field(
        None, description="Share of the texts that have a label that were answered none (None when every text has one).")
    calibration_error: float = Field(description="Expected calibration error of the confidence, over 10 bins.")
    stored: int = Field(0, description="Test texts that are stored examples: the fallback was trained on them, so the "
                                       "accuracy overstates what new texts get.")
    labels: list[LabelScores]
    routes: list[RouteScores]
    coverage: list[CoverageRow] = Field(description="For thresholds on the answer's confidence: share at or above, accuracy there.")
    llm_curve: list[SharePoint]
    report_md: Path
    confusion_png: Path
    reliability_png: Path
    llm_share_png: Path

    def summary(self) -> str:
        """One line for a terminal."""
        f1 = "-" if self.macro_f1 is None else f"{self.macro_f1:.3f}"
        stored = f"; {self.stored} of them stored examples (accuracy overstated)" if self.stored else ""
        return (f"{self.texts} texts: accuracy {self.accuracy:.3f}, macro-F1 {f1}, fallback alone "
                f"{self.fallback_accuracy:.3f}, sent to the LLM {self.llm_share:.1%}{self._scope()}{stored} -> "
                f"{self.report_md}")

    def _scope(self) -> str:
        if not self.out_of_scope:
            return ""
        in_scope = "" if self.in_scope_accuracy is None else (
            f", in scope: accuracy {self.in_scope_accuracy:.3f}, answered none {self.in_scope_rejected:.1%}")
        return f"; out of scope: {self.out_of_scope} texts, {self.out_of_scope_recall:.1%} answered none{in_scope}"


def evaluate(
    session: Session,
    texts: Sequence[str],
    labels: Sequence[str | None] | Sequence[Sequence[str]],
    out_dir: str | Path,
    *,
    title: str | None = None,
    progress: bool | None = None,
) -> EvalReport:
    """Classify labelled test texts once, measure the answers and write report.md and the plots into `out_dir`.

    `labels`: one label per text (None or "" for a text that has no label, if the task allows abstaining), or for
    multi-label tasks a label or a list of labels per text (an empty list: none applies). Raises ValueError naming
    the first bad row. `progress`: a bar of the LLM's answers on stderr (None: on a terminal, for more than a few).
    The session does not learn from these texts: learning from the LLM's answers is off
    while they are classified, so a test set never becomes training data (and the fallback cannot change between
    the answers and the replay of `llm_share.png`).
    """
    task = session.task
    truth = _truth(task.label_names, texts, labels, task.multi_label, task.allow_abstain)
    cascade = session.cascade
    with LLMBar(progress, "eval: LLM answers") as bar:  # _truth checked the texts
        outcome = cascade.run(list(texts), learn=False, fallback_answers=True, on_llm=bar.hook)
    predictions, certainty = outcome.predictions, outcome.certainty
    policy = cascade.policy

    names, multi = task.label_names, task.multi_label
    answers = _answers(predictions, names, multi)
    right = _right(answers, truth, multi)
    fallback_right = _right(_answers(outcome.fallback, names, multi), truth, multi)
    sent = np.zeros(len(texts), bool) if cascade.engine is None or not policy.asks_llm else ~policy.accepts(certainty)
    confidence = np.array([p.confidence for p in predictions])
    decided, decided_right = (confidence, right) if not multi else _label_decisions(predictions, names, answers, truth)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    report = EvalReport(
        title=title or f"Evaluation of {task.name}",
        texts=len(texts),
        multi_label=multi,
        engine=None if cascade.engine is None else cascade.engine.spec,
        accept_threshold=policy.accept_threshold,
        accuracy=float(accuracy_score(truth, answers)),
        macro_f1=_macro_f1(truth, answers, multi),
        fallback_accuracy=float(fallback_right.mean()),
        llm_share=float(sent.mean()),
        abstained=sum(p.route is Route.ABSTAIN for p in predictions),
        **_scope_scores(answers, truth, multi),
        calibration_error=_calibration_error(decided, decided_right),
        stored=session.store.count_stored(texts),
        labels=_label_scores(truth, answers, names, multi),
        routes=[_route_scores(route, predictions, right) for route in Route],
        coverage=coverage_table(confidence, right, (0.0, *TABLE_THRESHOLDS)),
        llm_curve=_llm_curve(policy, certainty, sent, right, fallback_right),
        report_md=out_dir / "report.md",
        confusion_png=out_dir / "confusion.png",
        reliability_png=out_dir / "reliability.png",
        llm_share_png=out_dir / "llm_share.png",
    )
    _save_figure(_confusion_figure(truth, answers, names, multi), report.confusion_png)
    _save_figure(_reliability_figure(decided, decided_right, multi, report.calibration_error), report.reliability_png)
    _save_figure(_llm_share_figure(report), report.llm_share_png)
    replace_atomically(report.report_md, lambda path: path.write_text(markdown(report), encoding="utf-8"))
    return report


# --- measuring ----------------------------------------------------------------------------------------------


def _truth(names: list[str], texts, labels, multi: bool, allow_none: bool) -> np.ndarray:
    """Single-label: each text's label index (-1: no label). Multi-label: an indicator matrix (texts x labels)."""
    if isinstance(texts, str) or isinstance(labels, str):
        raise TypeError("texts and labels must be sequences with one entry per text, not a single string")
    if len(texts) != len(labels) or not len(texts):
        raise ValueError(f"evaluate needs labelled texts: got {len(texts)} texts and {len(labels)} labels")
    position = {name: j for j, name in enumerate(names)}

    def index(label, row: int) -> int:
        if label not in position:
            raise ValueError(f"row {row}: unknown label {label!r}; the task's labels are {names}")
        return position[label]

    truth = np.zeros((len(texts), len(names)), bool) if multi else np.full(len(texts), -1)
    for row, (text, label) in enumerate(zip(texts, labels, strict=True)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"row {row}: text is empty or not a string")
        if multi:
            for one in [label] if isinstance(label, str) else label:
                truth[row, index(one, row)] = True
        elif label is None or label == "":
            if not allow_none:
                raise ValueError(f"row {row}: no label, but the task does not allow abstaining")
        elif not isinstance(label, str):
            raise ValueError(f"row {row}: single-label task needs one label per text, got {label!r}")
        else:
            truth[row] = index(label, row)
    return truth


def _scope_scores(answers: np.ndarray, truth: np.ndarray, multi: bool) -> dict:
    """What a chat router needs apart: how many out-of-scope texts (no label) were answered none, and how the texts
    in scope fared (accuracy, and the share wrongly answered none)."""
    none_true = ~truth.any(axis=1) if multi else truth < 0
    if not none_true.any():
        return {}
    none_answered = ~answers.any(axis=1) if multi else answers < 0
    in_scope = ~none_true
    right = _right(answers, truth, multi)
    return {
        "out_of_scope": int(none_true.sum()),
        "out_of_scope_recall": float(none_answered[none_true].mean()),
        "in_scope_accuracy": float(right[in_scope].mean()) if in_scope.any() else None,
        "in_scope_rejected": float(none_answered[in_scope].mean()) if in_scope.any() else None,
    }


def _answers(predictions: Sequence[Prediction], names: list[str], multi: bool) -> np.ndarray:
    """The answers in the shape of `_truth`."""
    if multi:
        return np.array([[name in p.labels for name in names] for p in predictions], bool)
    position = {name: j for j, name in enumerate(names)}
    return np.array([-1 if p.label is None else position[p.label] for p in predictions])


def _right(answers: np.ndarray, truth: np.ndarray, multi: bool) -> np.ndarray:
    return (answers == truth).all(axis=1) if multi else answers == truth


def _label_decisions(predictions, names, answers, truth) -> tuple[np.ndarray, np.ndarray]:
    """Multi-label: the confidence of each yes/no decision (text x label) and whether it was right, for the
    reliability diagram (see the module docstring)."""
    p_yes = np.array([[p.probabilities[name] for name in names] for p in predictions])
    return np.where(answers, p_yes, 1.0 - p_yes).ravel(), (answers == truth).ravel()


def _macro_f1(truth: np.ndarray, answers: np.ndarray, multi: bool) -> float | None:
    """Macro-F1 over the labels that occur in the truth or the answers: a label absent from both says nothing
    about the classifier, and counting it as F1 = 0 would punish a small test set for what it lacks."""
    if multi:
        present = np.flatnonzero(truth.any(axis=0) | answers.any(axis=0))
    else:
        present = np.setdiff1d(np.union1d(truth, answers), [-1])
    if not len(present):
        return None
    return float(f1_score(truth, answers, labels=present, average="macro", zero_division=0))


def _label_scores(truth, answers, names, multi) -> list[LabelScores]:
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, answers, labels=np.arange(len(names)), average=None, zero_division=0
    )
    return [
        LabelScores(label=name, precision=float(p), recall=float(r), f1=float(f), support=int(s))
        for name, p, r, f, s in zip(names, precision, recall, f1, support, strict=True)
    ]


def _route_scores(route: Route, predictions, right) -> RouteScores:
    taken = np.array([p.route is route for p in predictions])
    return RouteScores(route=route, answers=int(taken.sum()), accuracy=float(right[taken].mean()) if taken.any() else None)


def _reliability_bins(confidence: np.ndarray, right: np.ndarray):
    """Left edge, mean confidence, accuracy and count of each non-empty bin of width 1/RELIABILITY_BINS; the
    counts use sklearn's binning, so they line up with `calibration_curve`, which leaves empty bins out."""
    accuracy, mean_confidence = calibration_curve(right.astype(int), confidence, n_bins=RELIABILITY_BINS, pos_label=1)
    edges = np.linspace(0.0, 1.0, RELIABILITY_BINS + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=RELIABILITY_BINS)
    filled = counts > 0
    return edges[:-1][filled], mean_confidence, accuracy, counts[filled]


def _calibration_error(confidence: np.ndarray, right: np.ndarray) -> float:
    _, mean_confidence, accuracy, counts = _reliability_bins(confidence, right)
    return float(np.sum(counts * np.abs(accuracy - mean_confidence)) / counts.sum())


def _llm_curve(policy, certainty, sent, right, fallback_right) -> list[SharePoint]:
    """Accuracy against the share sent to the LLM for accept thresholds up to the one in force (module docstring).

    A lower threshold sends a subset of the texts sent in this run (those whose certainty is under it), so each
    point is exact; the texts under the threshold keep their final answer, the others take the fallback's."""
    # The lowest certainty of a sent text, as a threshold, sends none: the fallback alone.
    thresholds = np.unique(np.r_[certainty[sent], policy.accept_threshold])
    points = []
    for t in thresholds[thresholds <= policy.accept_threshold]:
        asked = sent & ~policy.model_copy(update={"accept_threshold": float(t)}).accepts(certainty)
        accuracy = np.where(asked, right, fallback_right).mean()
        points.append(SharePoint(accept_threshold=float(t), llm_share=float(asked.mean()), accuracy=float(accuracy)))
    return points


# --- writing ------------------------------------------------------------------------------------------------


def markdown(report: EvalReport) -> str:
    """report.md: headline numbers, routes, per-label table, coverage table, and the plots linked."""
    f1 = "-" if report.macro_f1 is None else f"{report.macro_f1:.3f}"
    kind = "multi-label: accuracy is exact match" if report.multi_label else "single-label"
    lines = [
        f"# {report.title}",
        "",
        f"{report.texts} labelled texts, {len(report.labels)} labels ({kind}); engine {report.engine or 'none'}, "
        f"accept threshold {report.accept_threshold:.3f}.",
        *(["", f"**Read with care:** {report.stored} of these texts are stored examples, which the fallback was "
               "trained on; the numbers overstate what new texts get. Test on texts the workspace has not seen."]
          if report.stored else []),
        "",
        "| measure | value |",
        "|---|---|",
        f"| accuracy | {report.accuracy:.3f} |",
        f"| macro-F1 | {f1} |",
        f"| fallback alone | {report.fallback_accuracy:.3f} |",
        f"| sent to the LLM | {report.llm_share:.1%} |",
        f"| abstained | {report.abstained} |",
        *([f"| out of scope (no label) | {report.out_of_scope} texts |",
           f"| out of scope answered none | {number_text(report.out_of_scope_recall)} |",
           f"| in-scope accuracy | {number_text(report.in_scope_accuracy)} |",
           f"| in scope answered none | {number_text(report.in_scope_rejected)} |"] if report.out_of_scope else []),
        f"| expected calibration error | {report.calibration_error:.3f} |",
        "",
        "## Answers by route",
        "",
        "| route | answers | accuracy |",
        "|---|---|---|",
        *(f"| {r.route.value} | {r.answers} | {number_text(r.accuracy)} |" for r in report.routes),
        "",
        "## Per label",
        "",
        "| label | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
        *(f"| {_cell(s.label)} | {s.precision:.3f} | {s.recall:.3f} | {s.f1:.3f} | {s.support} |" for s in report.labels),
        "",
        "## Coverage",
        "",
        "Texts whose answer's confidence is at least the threshold, and the accuracy of those answers.",
        "",
        "| confidence at least | coverage | accuracy |",
        "|---|---|---|",
        *(f"| {row.threshold:.2f} | {row.coverage:.3f} | {number_text(row.precision)} |" for row in report.coverage),
        "",
        "## Plots",
        "",
        f"![confusion]({report.confusion_png.name})",
        "",
        f"![reliability]({report.reliability_png.name})",
        "",
        f"![accuracy against the share sent to the LLM]({report.llm_share_png.name})",
        "",
        "The last plot replays this run's answers for lower accept thresholds (no new LLM calls); it stops at the "
        "share this run sent, past which no LLM answers were measured.",
        "",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """A label as a markdown table cell: a '|' in it would split the cell."""
    return text.replace("|", "\\|")


def _save_figure(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)  # Agg, explicitly: no window, no GUI toolkit, no global pyplot state
    replace_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))


def _confusion_figure(truth, answers, names: list[str], multi: bool) -> Figure:
    """Single-label: the confusion matrix (a '(none)' row and column when a text has no label or an answer
    abstained). Multi-label: each label's true positives, false negatives and false positives."""
    if multi:
        return _label_errors_figure(multilabel_confusion_matrix(truth, answers, labels=np.arange(len(names))), names)
    indices = list(range(len(names)))
    shown = list(names)
    if (truth < 0).any() or (answers < 0).any():
        indices.append(-1)
        shown.append(NO_LABEL)
    n = len(indices)
    side = float(np.clip(3 + 0.25 * n, 6, 30))
    figure = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = figure.add_subplot()
    matrix = confusion_matrix(truth, answers, labels=indices)
    display = ConfusionMatrixDisplay(matrix, display_labels=shown).plot(
        ax=ax, include_values=n <= MAX_CELL_VALUES, xticks_rotation="vertical", cmap="Blues", colorbar=False
    )
    figure.colorbar(display.im_, ax=ax, shrink=0.5, label="texts")
    ax.tick_params(labelsize=8 if n > MAX_CELL_VALUES else 10)
    if n > MAX_TICK_LABELS:
        ax.set(xticks=[], yticks=[])
        ax.set_title(f"{n} labels in task order (names in the per-label table)")
    ax.set(xlabel="answer", ylabel="true label")
    return figure


def _label_errors_figure(per_label: np.ndarray, names: list[str]) -> Figure:
    """Horizontal stacked bars per label from sklearn's per-label 2x2 matrices [[tn, fp], [fn, tp]]."""
    n = len(names)
    figure = Figure(figsize=(8, float(np.clip(1.5 + 0.25 * n, 4, 30))), layout="constrained")
    ax = figure.add_subplot()
    tp, fn, fp = per_label[:, 1, 1], per_label[:, 1, 0], per_label[:, 0, 1]
    rows = np.arange(n)
    ax.barh(rows, tp, color="tab:green", label="right (true positive)")
    ax.barh(rows, fn, left=tp, color="tab:orange", label="missed (false negative)")
    ax.barh(rows, fp, left=tp + fn, color="tab:red", label="wrongly answered (false positive)")
    ax.set_yticks(rows, names if n <= MAX_TICK_LABELS else [""] * n)
    ax.invert_yaxis()
    ax.set(xlabel="texts", title="Per-label decisions (multi-label)")
    ax.legend(loc="lower right", fontsize=8)
    return figure


def _reliability_figure(confidence, right, multi: bool, error: float) -> Figure:
    """Per confidence bin: the accuracy (bar), the mean confidence (dot; on the diagonal when calibrated) and the
    count, written on the bar and drawn below. Bins are not joined by a line: with few texts per bin a line
    suggests a trend that is not there."""
    left, mean_confidence, accuracy, counts = _reliability_bins(confidence, right)
    width = 1.0 / RELIABILITY_BINS
    unit = "yes/no decisions" if multi else "answers"
    figure = Figure(figsize=(6, 7), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    bars = top.bar(left, accuracy, width=width, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    top.bar_label(bars, labels=[f"n={n}" for n in counts], fontsize=8)
    top.scatter(mean_confidence, mean_confidence, color="tab:red", zorder=3, s=15, label="mean confidence")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.1),
            title=f"Reliability of the {unit}' confidence (ECE {error:.3f})")
    figure.legend(loc="outside lower center", ncols=3, fontsize=8)
    bottom.bar(left, counts, width=width, align="edge", edgecolor="black", color="tab:blue")
    bottom.set(xlabel="confidence", ylabel=unit)
    return figure


def _llm_share_figure(report: EvalReport) -> Figure:
    """The replayed curve, the fallback alone (share 0) and this run's point (see the module docstring)."""
    curve = report.llm_curve
    figure = Figure(figsize=(7, 5), layout="constrained")
    ax = figure.add_subplot()
    shares, accuracy = [p.llm_share for p in curve], [p.accuracy for p in curve]
    if len(curve) > 1:
        ax.step(shares, accuracy, where="post", label="this run, replayed at lower accept thresholds")
        ax.axvspan(report.llm_share, 1.0, color="grey", alpha=0.15, label="not measured: the LLM was not asked")
    ax.scatter([report.llm_share], [report.accuracy], marker="*", s=150, color="tab:red", zorder=3,
               label=f"this run (accept threshold {report.accept_threshold:.2f})")
    ax.scatter([0.0], [report.fallback_accuracy], marker="s", s=90, facecolors="none", edgecolors="tab:orange",
               linewidths=2, zorder=4, label="fallback alone")
    title = "Accuracy against the share of texts sent to the LLM"
    if report.llm_share == 0:
        title += "\n(no text was sent to the LLM in this run)"
    ax.set(xlabel="share of texts sent to the LLM", ylabel="accuracy", xlim=(-0.02, 1.02), ylim=(0, 1.02), title=title)
    ax.legend(loc="lower right", fontsize=8)
    return figure
