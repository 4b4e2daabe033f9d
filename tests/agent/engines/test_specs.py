import pytest

from labelcascade.agent.engines import EngineError, load_engine, normalize


def test_unknown_specs_list_the_supported_forms():
    with pytest.raises(ValueError, match="supported: 'llamacpp:default'"):
        load_engine("openai:gpt")
    with pytest.raises(ValueError, match="unknown engine spec 'vllm:'"):
        load_engine("vllm:")


def test_missing_gguf_file_is_an_engine_error(tmp_path):
    with pytest.raises(EngineError, match="no such GGUF model file"):
        load_engine(f"llamacpp:{tmp_path / 'absent.gguf'}")


def test_normalize_gives_a_distribution_and_honours_temperature():
    probabilities = normalize({"a": -1.0, "b": -2.0})
    assert probabilities["a"] + probabilities["b"] == pytest.approx(1.0)
    assert probabilities["a"] > probabilities["b"]
    softer = normalize({"a": -1.0, "b": -2.0}, temperature=10.0)
    assert softer["a"] < probabilities["a"]
