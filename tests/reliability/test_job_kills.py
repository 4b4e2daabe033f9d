"""A labelling job killed with SIGKILL at random points and resumed each time loses no row and repeats none.

The real CLI runs as a subprocess on the fallback alone (`--engine none`), which is deterministic, so the resumed
output must be byte-identical to an uninterrupted run. The kill points are row counts drawn with a fixed seed; the
kill lands while the batch after that count is in flight. CI: 2,000 rows, 6 kills; LABELCASCADE_RELIABILITY=long:
10,000 rows, 25 kills.
"""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest


from ..conftest import label_command, load_split, rows_done, write_texts_jsonl
from .conftest import scaled

pytestmark = pytest.mark.slow  # jobs run as processes and are killed

ROWS = scaled(2_000, 10_000)
KILLS = scaled(6, 25)
BATCH = 32
SEED = 6
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    rows = load_split("banking77", "train")[:ROWS]
    assert len(rows) == ROWS
    return write_texts_jsonl(tmp_path_factory.mktemp("input") / "messages.jsonl", rows)



def kill_when(process: subprocess.Popen, state: Path, rows: int) -> None:
    """SIGKILL the job once its state holds at least `rows` rows."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while rows_done(state) < rows and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, f"the job ended (code {process.returncode}) before it could be killed at {rows}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def test_a_job_killed_at_random_points_and_resumed_writes_every_row_once_as_if_never_killed(
    fallback_workspace, source, tmp_path
):
    began = time.monotonic()
    whole = tmp_path / "whole.jsonl"
    subprocess.run(label_command(fallback_workspace, source, whole, batch_size=BATCH), check=True, timeout=RUN_TIMEOUT_S,
                   stderr=subprocess.DEVNULL)
    expected = whole.read_bytes()
    uninterrupted_s = time.monotonic() - began

    resumed = tmp_path / "resumed.jsonl"
    state = resumed.with_name(resumed.name + ".state.sqlite")
    kill_points = sorted(random.Random(SEED).sample(range(1, ROWS), KILLS))
    done_after_kill = []
    resume = label_command(fallback_workspace, source, resumed, batch_size=BATCH)
    for kill_at in kill_points:
        process = subprocess.Popen(resume, stderr=subprocess.DEVNULL)
        kill_when(process, state, kill_at)
        assert not resumed.exists()  # no output until every row is done
        done = rows_done(state)
        assert done >= kill_at and done % BATCH == 0  # whole batches only
        assert not done_after_kill or done >= done_after_kill[-1]  # nothing committed is ever lost
        done_after_kill.append(done)
    finished = subprocess.run(resume, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert finished.returncode == 0, finished.stderr
    assert f"({done_after_kill[-1]} done by an earlier run)" in finished.stderr

    ids = [json.loads(line)["id"] for line in resumed.read_text().splitlines()]
    assert ids == list(range(ROWS))  # every row exactly once, in input order
    assert resumed.read_bytes() == expected
    print(f"\n{ROWS} rows, {KILLS} kills at rows {kill_points} (state held {done_after_kill} after each); "
          f"uninterrupted run {uninterrupted_s:.1f} s, whole test {time.monotonic() - began:.1f} s")
