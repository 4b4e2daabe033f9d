"""Every command in the README, run as written (from a scratch folder that sees the repository's examples), in the
README's order, on the embedded default LLM: if the README says it, it works.

Run elsewhere: `make test` (it is the CI command) and the benchmarks, which are run on purpose, not as tests. The
one liberty taken: `serve` gets a free port instead of 8000, and the `curl` after it the same port.
"""

import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import EXAMPLES, REPO

pytestmark = pytest.mark.slow  # every README command as a process, on the embedded LLM

PROGRAMS = ("labelcascade ", ".venv/bin/python examples/", "curl ", "make demo")


def readme_commands() -> list[str]:
    """The README's indented command lines (outside Python blocks), comments stripped, in order."""
    commands, in_code = [], False
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("    ") and line.strip().startswith(PROGRAMS):
            commands.append(re.sub(r"\s+#\s.*$", "", line.strip()))
    return commands


def test_the_readme_shows_every_front_door():
    commands = readme_commands()
    for subcommand in ("init", "add", "classify", "calibrate", "label", "eval", "retrain", "serve"):
        assert any(command.startswith(f"labelcascade {subcommand} ") for command in commands), subcommand
    assert "make demo" in commands and any("chat_router.py" in command for command in commands)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    if argv[0] == "labelcascade":
        argv[0] = str(Path(sys.executable).with_name("labelcascade"))
    elif argv[0] == ".venv/bin/python":
        argv[0] = sys.executable
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


def test_every_readme_command_runs_as_written(tmp_path):
    (tmp_path / "examples").symlink_to(EXAMPLES)
    port, server = free_port(), None
    try:
        for command in readme_commands():
            if command == "make demo":
                output = run(command, REPO)
                assert output.stdout.count('"route"') == 40 and "# accuracy" in output.stderr
            elif command.startswith("labelcascade serve"):
                if server is not None:
                    continue  # the same service, started again with other options: one is enough
                argv = [str(Path(sys.executable).with_name("labelcascade")), *shlex.split(command)[1:]]
                argv = [a for a in argv if a not in ("--port", "8000")] + ["--port", str(port)]
                server = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                wait_for(f"http://127.0.0.1:{port}/healthz", server)
            elif command.startswith("curl"):
                answer = run(command.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), tmp_path).stdout
                assert '"label":"lost_or_stolen_card"' in answer.replace(" ", "")
            else:
                output = run(command, tmp_path)
                check(command, output, tmp_path)
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
    assert (tmp_path / "labelled.parquet").is_file() and (tmp_path / "report" / "report.md").is_file()


def wait_for(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stderr.read().decode()
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within 120 s")


def check(command: str, output: subprocess.CompletedProcess, folder: Path) -> None:
    """What each kind of command must have done, beyond exiting 0."""
    if command.startswith("labelcascade classify") and "weather" in command:
        assert '"route": "abstain"' in output.stdout  # calibrated on dev.jsonl's out-of-scope texts
    elif command.startswith("labelcascade classify"):
        assert '"label": "lost_or_stolen_card"' in output.stdout
    elif command.startswith("labelcascade calibrate"):
        assert "| accept threshold | coverage | precision |" in output.stdout
    elif "--plan" in command:
        assert "LLM calls" in output.stdout and not (folder / "labelled.parquet").exists()
    elif command.startswith("labelcascade label"):
        assert "labelled 40 rows" in output.stderr and (folder / "review.label_config.xml").is_file()
        tasks = json.loads((folder / "review.json").read_text())  # Label Studio tasks, one per row to review; 0.55:
        # the default threshold for 10 labels, (1 + 1/10) / 2
        for task in tasks:
            [prediction] = task["predictions"]
            assert "text" in task["data"] and (
                prediction["score"] < 0.55 or prediction["model_version"].endswith(("(abstain)", "(degraded)")))
    elif "label_studio_export.json" in command:
        assert "added 3 new examples (3 rows)" in output.stdout
    elif command.startswith("labelcascade add-label"):
        assert "label 'travel_notice' added with 3 examples; 11 labels" in output.stdout
    elif command.startswith("labelcascade eval"):
        report = folder / shlex.split(command)[4]
        assert {"report.md", "confusion.png", "reliability.png", "llm_share.png"} <= {p.name for p in report.iterdir()}
        if "router_test" in command:
            assert "out of scope: 10 texts" in output.stdout and "out of scope answered none" in (report / "report.md").read_text()
    elif "chat_router.py" in command:
        assert output.stdout.count("bot:") == len((EXAMPLES / "banking" / "chat.txt").read_text().splitlines())


def readme_python(section: str) -> str:
    """The Python block of a README section, as written."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return body.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_python_api_runs_as_written(tmp_path):
    """The estimator and the session as the README shows them, on the embedded LLM, in a fresh interpreter."""
    (tmp_path / "examples").symlink_to(EXAMPLES)
    code = readme_python("Python API")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| accept threshold | coverage | precision |" in result.stdout
    assert (tmp_path / "banking-ws" / "settings.json").is_file() and (tmp_path / "banking-ws" / "calibration.json").is_file()
