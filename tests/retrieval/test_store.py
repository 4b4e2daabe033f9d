"""The example store against real SQLite, real FAISS, brute-force numpy and the real all-MiniLM-L6-v2 model."""

from __future__ import annotations

import math
import shutil

import faiss
import numpy as np
import pytest

from labelcascade.records import Example, Source
from labelcascade.retrieval import EmbedderMismatchError, ExampleStore
from labelcascade.retrieval import vector_index

DIM = 64


def unit_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def hits(results) -> list[list[tuple[int, float]]]:
    return [[(n.example.id, n.score) for n in row] for row in results]


def assert_same_hits(got, expected) -> None:
    assert [[i for i, _ in row] for row in got] == [[i for i, _ in row] for row in expected]
    for got_row, expected_row in zip(got, expected):
        np.testing.assert_allclose([s for _, s in got_row], [s for _, s in expected_row], atol=1e-5)


# ----------------------------------------------------------------------------------------- brute force in numpy


def brute_force(ids, vectors, row_labels, queries, k, allowed_labels=None):
    """Exact top-k by cosine among rows carrying one of `allowed_labels` (None: all rows)."""
    keep = np.array([allowed_labels is None or bool(set(labels) & set(allowed_labels)) for labels in row_labels])
    answers = []
    for query in queries:
        scores = vectors.astype(np.float64) @ query.astype(np.float64)
        order = [row for row in np.argsort(-scores, kind="stable") if keep[row]][:k]
        answers.append([(int(ids[row]), float(scores[row])) for row in order])
    return answers


def brute_force_balanced(ids, vectors, row_labels, queries, k, allowed_labels=None):
    """The balanced rule, spelled out: up to ceil(k/L) best per label dealt round by round, then the best overall."""
    labels = sorted({l for ls in row_labels for l in ls if allowed_labels is None or l in allowed_labels})
    quota = math.ceil(k / len(labels))
    answers = []
    for query in queries:
        scores = vectors.astype(np.float64) @ query.astype(np.float64)
        ranked = {
            label: sorted((row for row, ls in enumerate(row_labels) if label in ls), key=lambda r: -scores[r])[:quota]
            for label in labels
        }
        chosen: list[int] = []
        for depth in range(quota):
            layer = sorted((rows[depth] for rows in ranked.values() if len(rows) > depth), key=lambda r: -scores[r])
            for row in layer:
                if len(chosen) < k and row not in chosen:
                    chosen.append(row)
        for row, _ in sorted(enumerate(scores), key=lambda pair: -pair[1]):
            if len(chosen) == k:
                break
            if (allowed_labels is None or set(row_labels[row]) & set(allowed_labels)) and row not in chosen:
                chosen.append(row)
        chosen.sort(key=lambda r: -scores[r])
        answers.append([(int(ids[row]), float(scores[row])) for row in chosen])
    return answers


@pytest.fixture(scope="module")
def random_store():
    """2,000 random unit vectors, some with two labels, and one rare label with only two examples."""
    rng = np.random.default_rng(7)
    vectors = unit_rows(rng, 2000)
    row_labels = [
        ("rare",) if row in (10, 1500) else (f"l{row % 11}",) if row % 7 else (f"l{row % 11}", f"l{(row + 3) % 11}")
        for row in range(2000)
    ]
    store = ExampleStore(None, embedder_id="random", dim=DIM)
    ids = store.add([f"text {row}" for row in range(2000)], row_labels, vectors)
    queries = unit_rows(rng, 20)
    yield store, np.array(ids), vectors, row_labels, queries
    store.close()


# ----------------------------------------------------------------------------------------- exact search


def test_flat_search_matches_brute_force(random_store):
    store, ids, vectors, row_labels, queries = random_store
    for k in (1, 8, 25):
        assert_same_hits(hits(store.search(queries, k)), brute_force(ids, vectors, row_labels, queries, k))


def test_label_restricted_search_matches_brute_force(random_store):
    store, ids, vectors, row_labels, queries = random_store
    for allowed in (["l3"], ["l1", "l5", "rare"], ["rare"]):
        got = hits(store.search(queries, 8, labels=allowed))
        assert_same_hits(got, brute_force(ids, vectors, row_labels, queries, 8, allowed))
        carried = [set(n.example.labels) for row in store.search(queries, 8, labels=allowed) for n in row]
        assert all(labels & set(allowed) for labels in carried)
    assert store.search(queries[:2], 8, labels=["no such label"]) == [[], []]


def test_count_stored_counts_each_text_given_that_is_stored_outer_spaces_ignored(random_store):
    store = random_store[0]
    assert store.count_stored(["text 3", " text 3 ", "text 3", "text 1999\n", "text 2000", "new text"]) == 4


def test_source_restricted_search_keeps_only_those_sources():
    rng = np.random.default_rng(5)
    store = ExampleStore(None, embedder_id="random", dim=8)
    vectors = unit_rows(rng, 60, dim=8)
    for start, source in ((0, "gold"), (20, "llm"), (40, "review")):
        store.add([f"text {i}" for i in range(start, start + 20)], [(f"l{i % 3}",) for i in range(start, start + 20)],
                  vectors[start : start + 20], source=source)
    queries = unit_rows(rng, 5, dim=8)
    people = store.search(queries, 10, sources=["gold", "review"])
    assert all(len(row) == 10 and {n.example.source.value for n in row} <= {"gold", "review"} for row in people)
    everyone = store.search(queries, 60)
    assert [[n.example.id for n in row] for row in people] == [  # the same order, the llm examples left out
        [n.example.id for n in row if n.example.source.value != "llm"][:10] for row in everyone]
    assert {n.example.source.value for n in store.search(queries, 5, labels=["l1"], sources=["llm"])[0]} == {"llm"}


@pytest.mark.parametrize(
    ("k", "allowed"),
    [
        (8, None),  # 12 labels > k: the 8 labels with the best best-example get one each
        (24, None),  # quota 2 per label, exactly k
        (30, None),  # quota 3 per label, 36 candidates trimmed to 30 round by round
        (8, ["l0", "l1", "l2"]),  # quota 3, 9 candidates trimmed to 8
        (9, ["rare", "l4"]),  # "rare" has 2 examples for a quota of 5: the rest is filled from l4
        (5, ["rare"]),  # fewer examples than k
    ],
)
def test_balanced_search_matches_brute_force(random_store, k, allowed):
    store, ids, vectors, row_labels, queries = random_store
    got = hits(store.search(queries, k, labels=allowed, balanced=True))
    assert_same_hits(got, brute_force_balanced(ids, vectors, row_labels, queries, k, allowed))


def test_balanced_search_shows_every_label_when_k_allows(random_store):
    store, *_, queries = random_store
    for row in store.search(queries, 12, balanced=True):
        shown = {label for n in row for label in n.example.labels}
        assert shown == set(store.labels())
        assert [n.score for n in row] == sorted((n.score for n in row), reverse=True)


# ----------------------------------------------------------------------------------------- approximate search


def test_ivf_recall_against_brute_force(tmp_path):
    rng = np.random.default_rng(3)
    vectors = unit_rows(rng, 4000)
    row_labels = [f"l{row % 50}" for row in range(4000)]
    queries = unit_rows(rng, 100)
    with ExampleStore(tmp_path, embedder_id="random", dim=DIM, index="ivf") as store:
        ids = np.array(store.add([f"t{row}" for row in range(4000)], row_labels, vectors))
        for allowed in (None, ["l2"], ["l3", "l4", "l5", "l6", "l7"]):  # 2% and 10% of the examples
            got = hits(store.search(queries, 8, labels=allowed))
            truth = brute_force(ids, vectors, [(label,) for label in row_labels], queries, 8, allowed)
            found = sum(len({i for i, _ in g} & {i for i, _ in t}) for g, t in zip(got, truth))
            assert found / (8 * len(queries)) >= 0.9
    assert isinstance(faiss.read_index(str(tmp_path / "examples.faiss")), faiss.IndexIVFFlat)


def test_auto_index_switches_to_ivf_at_the_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(vector_index, "APPROX_INDEX_MIN_SIZE", 500)
    rng = np.random.default_rng(4)
    store = ExampleStore(tmp_path, embedder_id="random", dim=DIM, index="auto")
    store.add([f"a{row}" for row in range(499)], ["x"] * 499, unit_rows(rng, 499))
    store.save()
    assert isinstance(faiss.read_index(str(tmp_path / "examples.faiss")), faiss.IndexIDMap2)
    store.add(["one more"], ["x"], unit_rows(rng, 1))
    store.close()
    assert isinstance(faiss.read_index(str(tmp_path / "examples.faiss")), faiss.IndexIVFFlat)
    with ExampleStore.open(tmp_path) as reopened:
        assert reopened.index_kind == "auto" and len(reopened) == 500
    ExampleStore(tmp_path, embedder_id="random", dim=DIM, index="flat").close()  # asking for another kind switches
    assert isinstance(faiss.read_index(str(tmp_path / "examples.faiss")), faiss.IndexIDMap2)
    assert ExampleStore.open(tmp_path).index_kind == "flat"


# ----------------------------------------------------------------------------------------- persistence


def test_round_trip_with_real_embeddings(tmp_path, embedder):
    texts = ["I lost my card", "How do I change my PIN?", "The ATM kept my card", "Is there a fee for top-ups?"]
    labels = [["lost_card"], ["change_pin"], ["card_swallowed", "atm"], "top_up_fee"]
    vectors = embedder.embed(texts)
    queries = embedder.embed(["my card is gone", "what does topping up cost"])
    with ExampleStore(tmp_path, embedder_id=embedder.id, dim=embedder.dim) as store:
        ids = store.add(texts, labels, vectors, confidence=[1.0, 0.9, 0.8, 0.7])
        store.add(["card arrived broken"], ["damaged_card"], embedder.embed(["card arrived broken"]), source="llm")
        before = (store.examples(), store.training_data(), hits(store.search(queries, 3)), store.labels())

    reopened = ExampleStore.open(tmp_path, embedder_id=embedder.id)
    after = (reopened.examples(), reopened.training_data(), hits(reopened.search(queries, 3)), reopened.labels())
    assert after[0] == before[0]
    assert [e.id for e in after[0][:4]] == ids
    assert after[0][2].labels == ("card_swallowed", "atm") and after[0][4].source is Source.LLM
    np.testing.assert_array_equal(after[1][0], before[1][0])
    np.testing.assert_allclose(after[1][0][:4], vectors, atol=1e-6)
    assert after[1][1:3] == before[1][1:3]
    np.testing.assert_array_equal(after[1][3], [1.0, 0.9, 0.8, 0.7, 1.0])
    assert after[2] == before[2]
    assert after[3] == ["atm", "card_swallowed", "change_pin", "damaged_card", "lost_card", "top_up_fee"]
    assert reopened.embedder_id == embedder.id and reopened.dim == embedder.dim
    reopened.close()


@pytest.mark.parametrize("damage", ["delete", "stale", "garbage"])
def test_missing_or_inconsistent_faiss_file_is_rebuilt(tmp_path, damage):
    rng = np.random.default_rng(5)
    queries = unit_rows(rng, 5)
    with ExampleStore(tmp_path, embedder_id="random", dim=DIM) as store:
        store.add([f"t{row}" for row in range(300)], ["a", "b", "c"] * 100, unit_rows(rng, 300))
    stale = (tmp_path / "examples.faiss").read_bytes()
    with ExampleStore.open(tmp_path) as store:
        store.remove([1, 2, 3])  # same count, other ids: only an id check notices
        store.add(["x", "y", "z"], ["a", "b", "c"], unit_rows(rng, 3))
        expected = hits(store.search(queries, 8, labels=["a", "b"]))

    index_file = tmp_path / "examples.faiss"
    if damage == "delete":
        index_file.unlink()
    elif damage == "stale":
        index_file.write_bytes(stale)
    else:
        index_file.write_bytes(b"not a faiss index")
    with ExampleStore.open(tmp_path) as store:
        assert hits(store.search(queries, 8, labels=["a", "b"])) == expected
        assert len(store) == 300
    assert faiss.read_index(str(index_file)).ntotal == 300  # the rebuilt index was saved


def test_context_manager_saves_and_in_memory_store_works(tmp_path):
    rng = np.random.default_rng(6)
    with ExampleStore(tmp_path / "new" / "folder", embedder_id="random", dim=DIM) as store:
        store.add(["kept"], ["a"], unit_rows(rng, 1))
    assert [e.text for e in ExampleStore.open(tmp_path / "new" / "folder").examples()] == ["kept"]

    memory = ExampleStore(None, embedder_id="random", dim=DIM)
    memory.add(["only here"], ["a"], unit_rows(rng, 1))
    memory.save()
    assert len(memory) == 1 and list(tmp_path.glob("*.sqlite")) == []
    memory.close()
    memory.close()


# ----------------------------------------------------------------------------------------- embedder identity


def test_embedder_mismatch_is_refused(tmp_path):
    ExampleStore(tmp_path, embedder_id="model-a", dim=DIM).close()

    with pytest.raises(EmbedderMismatchError, match="model-a") as other_model:
        ExampleStore(tmp_path, embedder_id="model-b", dim=DIM)
    assert "model-b" in str(other_model.value) and "re-embed" in str(other_model.value)

    with pytest.raises(EmbedderMismatchError, match=f"dim {DIM}") as other_dim:
        ExampleStore(tmp_path, embedder_id="model-a", dim=DIM * 2)
    assert f"dim {DIM * 2}" in str(other_dim.value) and str(other_dim.value).count("model-a") == 2

    with pytest.raises(EmbedderMismatchError, match="model-a") as on_open:
        ExampleStore.open(tmp_path, embedder_id="model-b")
    assert "model-b" in str(on_open.value)
    assert isinstance(on_open.value, ValueError)
    assert ExampleStore.open(tmp_path).embedder_id == "model-a"


def test_reembed_replaces_every_vector_and_the_embedder_at_once_and_other_connections_must_reopen(tmp_path):
    """A body tuned again gives every stored text a new vector (`Session.retrain(body=True)`): all of them and the
    store's embedder id change in one transaction, texts not yet embedded by the caller are embedded, the index
    searches the new vectors, and a connection still on the old embedder is refused instead of mixing vectors."""
    rng = np.random.default_rng(3)
    store = ExampleStore(tmp_path, embedder_id="body-a", dim=DIM)
    texts = [f"text {i}" for i in range(6)]
    store.add(texts, [["x"], ["y"]] * 3, unit_rows(rng, 6))
    other = ExampleStore.open(tmp_path, embedder_id="body-a")
    new = unit_rows(rng, 6)
    asked = []

    def embed(missing):
        asked.extend(missing)
        return new[[texts.index(text) for text in missing]] * 3.0  # not unit length: the store normalises

    store.reembed("body-b", embed, known={text: new[i] for i, text in enumerate(texts[:4])})
    assert asked == texts[4:]
    assert store.embedder_id == "body-b" and ExampleStore.open(tmp_path).embedder_id == "body-b"
    np.testing.assert_allclose(store.training_data().vectors, new, atol=1e-6)
    assert [hit.example.text for hit in store.search(new[5:6], k=1)[0]] == ["text 5"]
    with pytest.raises(EmbedderMismatchError, match="another process re-embedded it"):
        other.add(["text 9"], [["x"]], unit_rows(rng, 1))
    with pytest.raises(EmbedderMismatchError, match="open it again"):
        other.search(new[:1], k=1)
    assert len(store) == 6
    with pytest.raises(ValueError, match="re-embedded vectors must have shape"):
        store.reembed("body-c", lambda missing: np.ones((len(missing), DIM + 1)))
    assert store.embedder_id == "body-b"  # the failed one changed nothing
    np.testing.assert_allclose(store.training_data().vectors, new, atol=1e-6)
    store.close()
    other.close()


def test_opening_a_folder_without_a_store_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no example store"):
        ExampleStore.open(tmp_path / "nothing here")


# ----------------------------------------------------------------------------------------- writes


def test_duplicate_text_is_stored_once_and_trusted_sources_win():
    rng = np.random.default_rng(8)
    vector = unit_rows(rng, 1)
    store = ExampleStore(None, embedder_id="random", dim=DIM)
    [gold_id] = store.add(["refund please"], ["refund"], vector, source=Source.GOLD)

    assert store.add(["refund please"], ["cancel"], vector, source="llm", confidence=0.6) == [gold_id]
    [kept] = store.get([gold_id])
    assert (kept.labels, kept.source, kept.confidence) == (("refund",), Source.GOLD, 1.0)

    assert store.add(["refund please"], [["refund", "complaint"]], vector, source=Source.REVIEW) == [gold_id]
    [reviewed] = store.get([gold_id])
    assert (reviewed.labels, reviewed.source) == (("refund", "complaint"), Source.REVIEW)
    assert reviewed.created_at == kept.created_at
    assert store.add(["refund please"], ["other"], vector, source="gold") == [gold_id]
    assert store.get([gold_id])[0].labels == ("refund", "complaint")
    assert len(store) == 1
    assert store.labels() == ["complaint", "refund"]
    assert [n.example.id for n in store.search(vector, 3, labels=["complaint"])[0]] == [gold_id]

    # Within one batch, the last of equal rank wins and both rows get the one id.
    ids = store.add(["same", "same"], ["first", "second"], unit_rows(rng, 2), source="llm")
    assert ids[0] == ids[1] and store.get(ids[:1])[0].labels == ("second",)
    assert store.search(unit_rows(rng, 1), 5, labels=["first"]) == [[]]
    assert len(store) == 2


def test_remove(tmp_path):
    rng = np.random.default_rng(9)
    vectors = unit_rows(rng, 50)
    with ExampleStore(tmp_path, embedder_id="random", dim=DIM) as store:
        ids = store.add([f"t{row}" for row in range(50)], ["common"] * 49 + ["unique"], vectors)
        assert store.remove([ids[0], ids[49], ids[0], 10_000]) == 2
        assert store.remove([10_000]) == 0
        assert len(store) == 48 and store.labels() == ["common"]
        with pytest.raises(KeyError, match=str(ids[0])):
            store.get([ids[1], ids[0]])
        found = {n.example.id for n in store.search(vectors, 50)[0]}
        assert found == set(ids[1:49])
    with ExampleStore.open(tmp_path) as store:
        assert len(store) == 48
        [new_id] = store.add(["fresh"], ["common"], unit_rows(rng, 1))
        assert new_id > max(ids)  # ids of removed examples are never reused


def test_examples_and_training_data_keep_insertion_order():
    rng = np.random.default_rng(10)
    vectors = unit_rows(rng, 4)
    store = ExampleStore(None, embedder_id="random", dim=DIM)
    store.add(["b", "a"], ["x", "y"], vectors[:2], source="gold")
    store.add(["d", "c"], [["y", "z"], "x"], vectors[2:], source="llm", confidence=[0.5, 0.25])
    assert [e.text for e in store.examples()] == ["b", "a", "d", "c"]
    assert [e.text for e in store.examples("llm")] == ["d", "c"]
    assert all(isinstance(e, Example) for e in store.examples(Source.GOLD))
    matrix, labels, sources, confidences, texts = store.training_data()
    assert texts == ["b", "a", "d", "c"]
    np.testing.assert_allclose(matrix, vectors, atol=1e-6)
    assert labels == [("x",), ("y",), ("y", "z"), ("x",)]
    assert sources == [Source.GOLD, Source.GOLD, Source.LLM, Source.LLM]
    np.testing.assert_array_equal(confidences, [1.0, 1.0, 0.5, 0.25])


def test_vectors_are_normalised_so_scores_are_cosines():
    store = ExampleStore(None, embedder_id="random", dim=2)
    store.add(["east", "north"], ["e", "n"], np.array([[3.0, 0.0], [0.0, 0.5]]))
    [[best, second]] = store.search(np.array([[2.0, 2.0]]), 2)
    assert best.score == pytest.approx(math.sqrt(0.5)) and second.score == pytest.approx(math.sqrt(0.5))


@pytest.mark.parametrize(
    ("texts", "labels", "vectors", "kwargs", "message"),
    [
        (["a", "b", "c"], ["x", "y", "z"], np.array([[1, 0], [0, 1], [np.nan, 1]]), {}, "row 2: example vector"),
        (["a", "b"], ["x", []], np.eye(2), {}, "row 1: labels is empty"),
        (["a", "b"], [["x", ""], "y"], np.eye(2), {}, "row 0: labels must be non-empty"),
        (["a", "b"], ["x", 3], np.eye(2), {}, "row 1: labels must be a string or a list"),
        (["a", " "], ["x", "y"], np.eye(2), {}, "row 1: text must be a non-empty string"),
        (["a", "b"], ["x", "y"], np.array([[1, 0], [0, 0]]), {}, "row 1: example vector is all zeros"),
        (["a", "b"], ["x", "y"], np.eye(2), {"confidence": [1.0, 1.5]}, "row 1: confidence"),
        (["a", "b"], ["x"], np.eye(2), {}, "2 texts, 1 labels and 2 vectors"),
        (["a", "b"], ["x", "y"], np.ones((2, 3)), {}, r"shape \(n, 2\)"),
        (["a"], ["x"], np.eye(2)[:1], {"source": "oracle"}, "source must be one of gold, llm, review"),
    ],
)
def test_bad_input_is_refused_naming_the_row(texts, labels, vectors, kwargs, message):
    store = ExampleStore(None, embedder_id="random", dim=2)
    with pytest.raises(ValueError, match=message):
        store.add(texts, labels, vectors, **kwargs)
    assert len(store) == 0  # nothing half-stored


def test_bad_queries_are_refused():
    store = ExampleStore(None, embedder_id="random", dim=2)
    with pytest.raises(ValueError, match="row 1: query vector"):
        store.search(np.array([[1.0, 0.0], [np.inf, 0.0]]))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        store.search(np.eye(2), 0)
    assert store.search(np.eye(2), 3) == [[], []]  # an empty store answers nothing


# ----------------------------------------------------------------------------------------- real embeddings


def test_semantic_search_finds_the_matching_intent(embedder):
    examples = {
        "I think someone stole my card, please block it": "lost_or_stolen_card",
        "What is the exchange rate for euros to dollars?": "exchange_rate",
        "My transfer to my landlord still hasn't arrived": "transfer_not_received",
        "How can I change the PIN of my card?": "change_pin",
        "I was charged twice for the same coffee": "duplicate_charge",
        "Why was my top-up declined?": "top_up_failed",
    }
    store = ExampleStore(None, embedder_id=embedder.id, dim=embedder.dim)
    store.add(list(examples), list(examples.values()), embedder.embed(list(examples)))
    queries = {
        "my wallet was taken on the train and my bank card was in it": "lost_or_stolen_card",
        "the money I sent two days ago never showed up": "transfer_not_received",
        "there are two identical payments on my statement": "duplicate_charge",
        "how many dollars do I get for 100 euros": "exchange_rate",
    }
    results = store.search(embedder.embed(list(queries)), 2)
    assert [row[0].example.label for row in results] == list(queries.values())
    assert all(row[0].score > row[1].score for row in results)


def test_a_store_copied_elsewhere_opens_the_same(tmp_path, embedder):
    texts = ["block my card", "send money abroad"]
    with ExampleStore(tmp_path / "a", embedder_id=embedder.id, dim=embedder.dim) as store:
        store.add(texts, ["card", "transfer"], embedder.embed(texts))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    with ExampleStore.open(tmp_path / "b", embedder_id=embedder.id) as copy:
        [[top]] = copy.search(embedder.embed(["international transfer"]), 1)
        assert top.example.label == "transfer"
