"""Sources, held-out split, tokenizer, packing and the resumable iterator."""

import json
import sys
import types

import numpy as np
import pytest

from jdlm import data
from jdlm.errors import JdlmError

CODE = "def f(x):\n    return x ** 2  # squares\n\n\tclass Ünïcode: pass\n"


def test_embedded_corpora():
    docs = data.pydocs_texts()
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000
    assert any("assignment statement" in d.lower() for d in docs)
    src = data.pystdlib_texts()
    assert len(src) > 300 and any("def " in s for s in src)


def test_local_files_and_bad_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n"
                                      + json.dumps({"text": "third"}) + "\n")
    assert data.load_texts(str(tmp_path / "a.txt")) == ["first document"]
    assert data.load_texts(str(tmp_path)) == ["first document", "second", "third"]
    assert data.load_texts(f"{tmp_path / 'a.txt'}+{tmp_path / 'b.jsonl'}")[1:] == ["second", "third"]
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(JdlmError, match="no text"):
        data.load_texts(str(tmp_path / "empty.txt"))
    with pytest.raises(JdlmError, match="unknown data source"):
        data.load_texts("wikipedia-please")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(JdlmError, match="'text' field"):
        data.load_texts(str(tmp_path / "bad.jsonl"))


def test_tfds_source_through_its_api(monkeypatch):
    # TensorFlow is not a test dependency: a stand-in module exercises jdlm's side of the API.
    calls = {}

    def load(name, split):
        calls["args"] = (name, split)
        return [{"text": b"caf\xc3\xa9"}, {"text": "plain"}]

    fake = types.SimpleNamespace(load=load, as_numpy=lambda ds: iter(ds))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    assert data.load_texts("tfds:lm1b:validation") == ["café", "plain"]
    assert calls["args"] == ("lm1b", "validation")
    with pytest.raises(JdlmError, match="no 'text' feature"):
        data.texts_from_examples([{"content": b"x"}])


@pytest.mark.tfds  # needs TensorFlow: `pip install -e ".[tfds]" && python -m pytest -m tfds`
def test_tfds_mock_data():
    try:
        import tensorflow_datasets as tfds
    except ImportError:  # selected with `-m tfds`: a missing extra is a failure, not a skip
        pytest.fail('the [tfds] extra is not installed: pip install -e ".[tfds]"', pytrace=False)
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        texts = data.load_texts("tfds:lm1b:train")
    assert len(texts) == 6 and all(isinstance(t, str) and t for t in texts)


def test_tfds_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(JdlmError, match=r"jdlm\[tfds\]"):
        data.load_texts("tfds:lm1b")


def test_heldout_split_is_deterministic():
    docs = [f"document number {i}" for i in range(400)]
    train, held = data.split_heldout(docs, 0.1)
    assert set(train) | set(held) == set(docs) and not set(train) & set(held)
    assert 15 < len(held) < 70
    train2, held2 = data.split_heldout(docs[::-1] + ["new one"], 0.1)
    assert set(held) <= set(held2)  # membership depends on the document only
    _, tiny = data.split_heldout(["a", "b"], 0.01)
    assert len(tiny) == 1


def test_tokenizer_roundtrip_and_transformers(tmp_path):
    import transformers

    texts = data.pydocs_texts()[:20] + [CODE]
    data.train_tokenizer(texts, 400, tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 400
    assert tok.mask_token == "<|mask|>" and tok.eos_token == "<|eos|>"
    assert tok.pad_token_id is not None and tok.bos_token_id is not None
    for text in (CODE, "The with statement\n  is used to wrap"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    with pytest.raises(JdlmError, match="vocab_size"):
        data.train_tokenizer(texts, 100, tmp_path)


def test_tokenizer_command(tmp_path):
    import transformers

    from jdlm.cli import main

    (tmp_path / "corpus.txt").write_text("\n".join(data.pydocs_texts()[:5]) + CODE)
    assert main(["tokenizer", "train", "--data", str(tmp_path / "corpus.txt"), "--vocab-size",
                 "300", "--out", str(tmp_path / "tok")]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) == 300 and tok.decode(tok(CODE, add_special_tokens=False)["input_ids"]) == CODE


def test_pack_rows():
    docs = [[1, 2, 3], [4, 5], [6]]
    rows = data.pack(docs, 4, bos=8, eos=9)
    np.testing.assert_array_equal(rows, [[8, 1, 2, 3], [9, 8, 4, 5], [9, 8, 6, 9]])
    with pytest.raises(JdlmError, match="fewer than one row"):
        data.pack([[1]], 16, bos=8, eos=9)


def test_sft_rows():
    rows = data.sft_rows([([5, 6], [7]), ([1] * 10, [2])], seq_len=6, bos=8, eos=9)
    np.testing.assert_array_equal(rows["tokens"], [[8, 5, 6, 7, 9, 9]])  # the long one dropped
    np.testing.assert_array_equal(rows["prompt_mask"], [[1, 1, 1, 0, 0, 0]])


def test_iterator_resume_and_epochs():
    rows = np.arange(50)[:, None] * np.ones((1, 3), np.int32)
    it = data.BatchIterator({"tokens": rows}, 8, seed=3)
    first_epoch = np.concatenate([next(it)["tokens"][:, 0] for _ in range(6)])
    assert len(set(first_epoch)) == 48  # no row twice within an epoch
    for _ in range(4):
        next(it)
    saved = json.loads(json.dumps(it.get_state()))
    expected = [next(it)["tokens"] for _ in range(5)]
    again = data.BatchIterator({"tokens": rows}, 8, seed=3)
    again.set_state(saved)
    for want in expected:
        np.testing.assert_array_equal(next(again)["tokens"], want)
    with pytest.raises(JdlmError, match="batch_size"):
        data.BatchIterator({"tokens": rows}, 4, seed=3).set_state(saved)
    with pytest.raises(JdlmError, match="fewer than its batch"):
        data.BatchIterator({"tokens": rows}, 64)


def test_host_shards_partition_the_data():
    items = list(range(23))
    shards = [data.host_shard(items, i, 4) for i in range(4)]
    assert sorted(x for s in shards for x in s) == items


def test_synthetic_spec():
    assert data.parse_synthetic("synthetic:bigram")["vocab"] == 8
    assert data.parse_synthetic("synthetic:vocab=5,order=3")["order"] == 3
    with pytest.raises(JdlmError, match="bad synthetic option"):
        data.parse_synthetic("synthetic:colour=3")
