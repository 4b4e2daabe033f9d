"""A body's default prompt, as tuning, the onnxruntime graph and the SetFit benchmark read it off a real body."""

from labelcascade.body_prompt import default_prompt
from labelcascade.retrieval.e5_body import QUERY_PROMPT
from labelcascade.retrieval.embedders import default_model_dir, load_sentence_transformer


def test_the_packaged_body_has_no_prompt_and_a_body_saved_with_e5s_prompt_gives_it(tmp_path):
    body = load_sentence_transformer(default_model_dir())
    assert default_prompt(body) == ""
    body.prompts = {"query": QUERY_PROMPT}
    assert default_prompt(body) == ""  # a prompt that is not the default one is not added to every text
    body.default_prompt_name = "query"
    body.save(str(tmp_path / "body"))
    assert default_prompt(load_sentence_transformer(tmp_path / "body")) == QUERY_PROMPT
