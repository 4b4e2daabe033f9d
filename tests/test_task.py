from pathlib import Path

import pytest

from labelcascade.task import Task, TaskError

from .conftest import EXAMPLES


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "task.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_task_loads_with_its_seed_examples():
    task = Task.from_yaml(EXAMPLES / "banking" / "task.yaml")
    assert len(task.labels) == 10
    assert task.labels[0].description
    seeds = task.seed_examples()
    assert len(seeds) == 80
    assert all(len(labels) == 1 and labels[0] in task.label_names for _, labels in seeds)


def test_bare_label_names_and_task_level_examples(tmp_path):
    task = Task.from_yaml(write(tmp_path, """
name: sentiment
labels: [positive, negative]
examples:
  - {text: "great film", label: positive}
"""))
    assert task.label_names == ["positive", "negative"]
    assert task.seed_examples() == [("great film", ("positive",))]
    assert not task.multi_label and not task.allow_abstain


def test_yaml_round_trip(tmp_path):
    task = Task.from_yaml(EXAMPLES / "banking" / "task.yaml")
    task.to_yaml(tmp_path / "copy.yaml")
    assert Task.from_yaml(tmp_path / "copy.yaml") == task


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("name: t\nlabels: [a, b, A]\n", "line 2: labels[2].name: duplicate label 'A'"),
        ("name: t\nlabels:\n  - name: a\n  - name: ''\n", "line 4: labels[1].name: label name is empty"),
        ("name: t\nlabels:\n  - name: a\n  - name: b\n    colour: red\n", "line 5: labels[1].colour: unknown key 'colour'"),
        ("name: t\nlabels: [a, b]\ncolour: red\n", "line 3: colour: unknown key 'colour'"),
        ("name: t\nlabels: [a, b]\nexamples:\n  - {text: hi, label: c}\n", "line 4: examples[0].label: unknown label 'c'"),
        ("name: t\nlabels: [a, b]\nexamples:\n  - {text: hi, label: [a, b]}\n", "2 labels given but the task is single-label"),
        ("name: t\nlabels:\n  - name: a\n    examples: ['  ']\n  - b\n", "labels[0].examples: example 0 is an empty text"),
        ("labels: [a, b]\n", "name: required field is missing"),
        ("name: t\nlabels: [a]\n", "a single-label task needs at least 2 labels"),
        ("name: t\nlabels: [a, b\n", "line 3: not valid YAML"),
        ("- a\n- b\n", "must be a YAML mapping"),
    ],
)
def test_bad_task_files_are_refused_naming_file_line_and_field(tmp_path, yaml_text, expected):
    path = write(tmp_path, yaml_text)
    with pytest.raises(TaskError) as error:
        Task.from_yaml(path)
    assert str(error.value).startswith(f"{path}: ")
    assert expected in str(error.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(TaskError, match="no such task file"):
        Task.from_yaml(tmp_path / "absent.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(TaskError, match="not UTF-8"):
        Task.from_yaml(tmp_path / "bin.yaml")


def test_multi_label_task_accepts_label_lists():
    task = Task.build({"name": "topics", "multi_label": True, "labels": ["sport", "money"],
                       "examples": [{"text": "football club sold for millions", "label": ["sport", "money"]}]})
    assert task.seed_examples() == [("football club sold for millions", ("sport", "money"))]


def test_check_labels_names_the_row():
    task = Task.from_labels(["a", "b"])
    task.check_labels([("a",), ("b",)])
    with pytest.raises(TaskError, match=r"row 1: unknown label 'z'"):
        task.check_labels([("a",), ("z",)])
