import gc
import subprocess
import sys

import pytest

from labelcascade.fallback import LinearSVMClassifier
from labelcascade.task import Task
from labelcascade.workspace import FALLBACK_DIR, SETTINGS_FILE, Settings, Workspace, WorkspaceError

TASK = Task.from_labels(["a", "b"], name="ab")


def fitted_model(seed: int) -> LinearSVMClassifier:
    import numpy as np

    rng = np.random.default_rng(seed)
    return LinearSVMClassifier().fit(rng.normal(size=(20, 4)), ["a", "b"] * 10)


def test_create_then_open_round_trips_task_and_settings(tmp_path):
    Workspace.create(tmp_path / "ws", TASK, Settings(index="flat", svm_C=0.5))
    opened = Workspace.open(tmp_path / "ws")
    assert opened.task == TASK and opened.settings == Settings(index="flat", svm_C=0.5)
    assert opened.load_fallback() is None


def test_refuses_non_empty_folder_and_non_workspace(tmp_path):
    (tmp_path / "stray.txt").write_text("x")
    with pytest.raises(WorkspaceError, match="not empty"):
        Workspace.create(tmp_path, TASK)
    with pytest.raises(WorkspaceError, match="not a labelcascade workspace"):
        Workspace.open(tmp_path)


def test_invalid_settings_name_the_file(tmp_path):
    Workspace.create(tmp_path, TASK)
    (tmp_path / SETTINGS_FILE).write_text('{"svm_C": -1}')
    with pytest.raises(WorkspaceError, match=f"{SETTINGS_FILE}: invalid settings"):
        Workspace.open(tmp_path)


def test_fallback_swap_survives_an_interrupted_save(tmp_path):
    workspace = Workspace.create(tmp_path, TASK)
    first, second = fitted_model(0), fitted_model(1)
    workspace.save_fallback(first)
    workspace.save_fallback(second)
    assert (workspace.load_fallback().coef_ == second.coef_).all()
    # A crash after moving the current model aside but before moving the new one in: the old one is whole.
    (tmp_path / FALLBACK_DIR).rename(tmp_path / (FALLBACK_DIR + ".old"))
    assert (workspace.load_fallback().coef_ == second.coef_).all()
    assert not (tmp_path / (FALLBACK_DIR + ".old")).exists()


def test_a_body_lock_claim_refuses_a_second_one_until_released_or_its_process_dies(tmp_path):
    """A body retrain holds the body lock from its start to its swap; a second one started meanwhile (this process
    or another) is refused by name, and the lock comes back when the claim is released, dropped, or its process
    is killed (a real SIGKILL: nothing but the process's death releases it then)."""
    workspace = Workspace.create(tmp_path / "ws", TASK)
    claim = workspace.claim_body_lock()
    with pytest.raises(WorkspaceError, match="another body retrain is running on this workspace"):
        workspace.claim_body_lock()
    claim.release()
    claim.release()  # a second release does nothing
    assert not claim.held
    claim = workspace.claim_body_lock()
    del claim
    gc.collect()
    again = workspace.claim_body_lock()
    again.release()

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from labelcascade.workspace import Workspace; "
        "claim = Workspace.open(sys.argv[1]).claim_body_lock(); print('held', flush=True); sys.stdin.read()"),
        str(workspace.path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceError, match="another body retrain is running"):
            workspace.claim_body_lock()
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()
    workspace.claim_body_lock().release()
