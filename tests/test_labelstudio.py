"""Label Studio's JSON both ways, with the real fallback and CLI: a job's review file as tasks whose pre-annotations
point at the labelling interface written beside it; a project's export (the people's answers) read back by `add`
and `eval`, never taking the cascade's own guess in `data` for a label."""

import json
import xml.etree.ElementTree as ElementTree

import pytest
from typer.testing import CliRunner

from labelcascade import Session
from labelcascade.cli import app
from labelcascade.jobs import LabelJob
from labelcascade.labelstudio import config_path
from labelcascade.tables import InputError, read_rows
from labelcascade.task import Task

from .conftest import BANKING_TASK

MESSAGES = ["my card got stolen", "what is the exchange rate", "is it raining in Paris?"]


@pytest.fixture
def review(fallback_workspace, embedder, tmp_path):
    """A job's output and review (every row, review_below > 1) as Label Studio tasks."""
    source = tmp_path / "in.csv"
    source.write_text("id,message\n" + "".join(f'{i},"{text}"\n' for i, text in enumerate(MESSAGES, 1)))
    session = Session.open(fallback_workspace, embedder=embedder)
    summary = LabelJob(session, source, tmp_path / "out.json", text_column="message", prefix="pred_",
                       review=tmp_path / "review.json", review_below=1.01).run(progress=False)
    session.close()
    assert summary.review_rows == len(MESSAGES)
    return tmp_path / "review.json"


def test_review_tasks_carry_the_answer_as_a_pre_annotation_of_the_interface_beside_them(review):
    tasks = json.loads(review.read_text())
    assert [task["data"]["message"] for task in tasks] == MESSAGES
    assert [task["data"]["row"] for task in tasks] == [1, 2, 3] and tasks[0]["data"]["id"] == "1"
    interface = ElementTree.fromstring(config_path(review).read_text())
    text, choices = interface.find("Text"), interface.find("Choices")
    assert text.get("value") == "$message" and choices.get("toName") == text.get("name")
    assert choices.get("choice") == "single"
    assert [choice.get("value") for choice in choices] == Task.from_yaml(BANKING_TASK).label_names
    for task in tasks:
        [prediction] = task["predictions"]
        assert prediction["score"] == task["data"]["pred_confidence"]
        assert prediction["model_version"].startswith("labelcascade ") and task["data"]["pred_route"] in prediction["model_version"]
        [result] = prediction["result"]
        assert (result["from_name"], result["to_name"], result["type"]) == (choices.get("name"), text.get("name"), "choices")
        assert result["value"]["choices"] == [task["data"]["pred_label"]]
    whole = json.loads((review.parent / "out.json").read_text())
    assert [task["data"]["message"] for task in whole] == MESSAGES and "row" not in whole[0]["data"]


def _annotate(task: dict, choices: list[str], *, cancelled: bool = False, at: str = "2026-12-01T10:00:00Z") -> None:
    """What a person's answer looks like in Label Studio's JSON export."""
    task.setdefault("annotations", []).append({
        "id": len(task.get("annotations", [])) + 1, "was_cancelled": cancelled, "created_at": at, "updated_at": at,
        "result": [] if cancelled else [{"from_name": "label", "to_name": "text", "type": "choices",
                                         "value": {"choices": choices}}],
    })


def test_an_export_gives_the_latest_annotation_that_was_not_skipped(review, tmp_path):
    tasks = json.loads(review.read_text())
    _annotate(tasks[0], ["card_arrival"], at="2026-12-01T09:00:00Z")
    _annotate(tasks[0], ["lost_or_stolen_card"], at="2026-12-01T11:00:00Z")  # a later correction wins
    _annotate(tasks[1], ["exchange_rate"])
    _annotate(tasks[1], ["card_arrival"], cancelled=True, at="2026-12-01T12:00:00Z")  # a skip is no answer
    tasks[2]["annotations"] = [{"id": 9, "was_cancelled": False, "result": []}]  # answered "none of these"
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    labels = Task.from_yaml(BANKING_TASK).label_names
    rows = list(read_rows(export, text_column="message", label_column="label", known_labels=labels, no_label=()))
    assert [(row.line, row.text, row.labels) for row in rows] == [
        (1, MESSAGES[0], ("lost_or_stolen_card",)), (2, MESSAGES[1], ("exchange_rate",)), (3, MESSAGES[2], ())]
    with pytest.raises(InputError, match=r"export.json: task 3: label: empty label"):
        list(read_rows(export, text_column="message", label_column="label"))  # gold needs a label
    del tasks[1]["annotations"]
    export.write_text(json.dumps(tasks))
    with pytest.raises(InputError, match=r"export.json: task 2: not annotated \(or skipped\) in Label Studio"):
        list(read_rows(export, text_column="message", label_column="label"))
    # the data's own label column (here the cascade's guess) is never read as a person's label
    assert [row.labels for row in read_rows(review, text_column="message")] == [(), (), ()]


def test_add_takes_the_people_s_corrections_from_an_export(review, tmp_path):
    tasks = json.loads(review.read_text())[:2]
    _annotate(tasks[0], ["lost_or_stolen_card"])
    _annotate(tasks[1], ["exchange_rate"])
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    workspace = tmp_path / "ws"
    runner = CliRunner()
    assert runner.invoke(app, ["init", str(workspace), "--task", str(BANKING_TASK), "--engine", "none"]).exit_code == 0
    result = runner.invoke(app, ["add", str(workspace), str(export), "--review", "--text-column", "message"])
    assert result.exit_code == 0, result.output
    assert "added 2 new examples (2 rows)" in result.stdout
    for bad, message in (("[1]", "task 1: no 'data' object"), ("{", "line 1: not valid JSON"),
                         ('"text"', "expected a list of Label Studio tasks")):
        export.write_text(bad)
        result = runner.invoke(app, ["add", str(workspace), str(export)])
        assert isinstance(result.exception, InputError) and message in str(result.exception)  # main() prints it


def test_a_job_labels_label_studio_tasks_given_as_its_input(review, fallback_workspace, embedder, tmp_path):
    """Tasks already in Label Studio (here: the review file) labelled again, their `data` columns kept."""
    session = Session.open(fallback_workspace, embedder=embedder)
    summary = LabelJob(session, review, tmp_path / "again.jsonl", text_column="message", prefix="new_").run(progress=False)
    session.close()
    rows = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert summary.rows == len(MESSAGES) and [row["message"] for row in rows] == MESSAGES
    assert [row["new_label"] for row in rows] == [row["pred_label"] for row in rows]  # the same fallback answers
