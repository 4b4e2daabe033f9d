from labelcascade.packed_texts import packed_texts, unpacked_texts


def test_texts_are_packed_as_bytes_not_as_a_unicode_array_sized_by_the_longest():
    texts = ["", "short", "水稻品种", "x" * 1_000_000]
    data, ends = packed_texts(texts)
    assert data.nbytes == sum(len(text.encode()) for text in texts) and unpacked_texts(data, ends) == texts
    assert unpacked_texts(*packed_texts([])) == []
