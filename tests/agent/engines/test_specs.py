import pytest

from labelcascade.agent.engines import EngineError, load_engine
from labelcascade.agent.engines.base import version_at_least


def test_unknown_specs_list_the_supported_forms():
    with pytest.raises(ValueError, match="supported: 'llamacpp:default'"):
        load_engine("openai:gpt")
    with pytest.raises(ValueError, match="unknown engine spec 'vllm:'"):
        load_engine("vllm:")


def test_missing_gguf_file_is_an_engine_error(tmp_path):
    with pytest.raises(EngineError, match="no such GGUF model file"):
        load_engine(f"llamacpp:{tmp_path / 'absent.gguf'}")


def test_versions_compare_by_their_leading_numbers():
    assert version_at_least("0.12.1rc2", (0, 12)) and version_at_least("1.0", (0, 12))
    assert not version_at_least("0.11.2", (0, 12)) and not version_at_least("0.9.0.dev1+cpu", (0, 12))
    assert version_at_least("4.56.0.dev0", (4, 56)) and not version_at_least("4.5", (4, 56))
