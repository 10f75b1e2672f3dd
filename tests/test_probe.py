"""`jdlm probe` on a tiny model with a real BPE tokenizer: the table against an unpadded,
one-prompt-at-a-time numpy computation, frequency ranks against a direct count, the outputs."""

import csv
import json
from collections import Counter

import numpy as np
import pytest
from tiny_text_model import save_tiny_text_model

import jdlm
from jdlm.cli import main
from jdlm.eval.probe import DEFAULT_PROMPTS, token_category

PROMPTS = ["The for statement", "A class definition is an executable statement that",
           "x"]
NUM_MASKS = 24
CORPUS = ("The for statement is used to iterate over the elements of a sequence. "
          "The the the , , . \n") * 5


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    model_dir = save_tiny_text_model(root / "model")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS)
    out = root / "out"
    assert main(["probe", "--model", str(model_dir), "--prompts", str(prompts), "--num-masks",
                 str(NUM_MASKS), "--corpus", str(corpus), "--batch-size", "2",
                 "--out", str(out)]) == 0
    with (out / "positions.csv").open() as f:
        rows = list(csv.DictReader(f))
    return jdlm.load(model_dir), out, rows


def _reference(model, ids: list[int], num_masks: int = NUM_MASKS):
    """Top-3 ids, probabilities and entropy at the masks: batch 1, no padding, numpy softmax."""
    tokens = np.array([ids + [model.config.mask_token_id] * num_masks])
    logits = np.asarray(model.logits(tokens))[0, len(ids):].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    top = np.argsort(-logp, axis=-1, kind="stable")[:, :3]
    return top, np.exp(np.take_along_axis(logp, top, -1)), -(np.exp(logp) * logp).sum(-1)


def test_table_matches_an_unpadded_forward_per_prompt(probed):
    model, _, rows = probed
    assert len(rows) == len(PROMPTS) * NUM_MASKS
    for p, prompt in enumerate(PROMPTS):
        mine = [r for r in rows if int(r["prompt_index"]) == p]
        assert [int(r["distance"]) for r in mine] == list(range(1, NUM_MASKS + 1))
        top, probs, entropy = _reference(model, model.tokenizer(prompt)["input_ids"])
        got_probs = np.array([[float(r[f"top{j}_prob"]) for j in (1, 2, 3)] for r in mine])
        np.testing.assert_allclose(got_probs, probs, rtol=1e-4)
        np.testing.assert_allclose([float(r["entropy"]) for r in mine], entropy, rtol=1e-4)
        # Ids must agree wherever the probabilities are not (numerically) tied.
        got_top1 = np.array([int(r["top1_id"]) for r in mine])
        clear = probs[:, 0] - probs[:, 1] > 1e-6
        np.testing.assert_array_equal(got_top1[clear], top[clear, 0])
        assert [r["top1_text"] for r in mine] == [model.tokenizer.decode([t]) for t in got_top1]


def test_frequency_rank_is_the_corpus_count_rank(probed):
    model, _, rows = probed
    counts = Counter(model.tokenizer(CORPUS, add_special_tokens=False)["input_ids"])
    for r in rows:
        token = int(r["top1_id"])
        c = counts.get(token, 0)
        # 1 + tokens strictly more frequent + equally frequent ones with a smaller id
        want = 1 + sum(1 for t in range(model.config.vocab_size)
                       if counts.get(t, 0) > c or (counts.get(t, 0) == c and t < token))
        assert int(r["top1_rank"]) == want


def test_outputs_and_aggregates_agree_with_the_table(probed):
    _, out, rows = probed
    for name in ("heatmap.png", "aggregates.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    agg = json.loads((out / "aggregates.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert agg["distance"] == list(range(1, NUM_MASKS + 1))
    for d in (1, NUM_MASKS):
        at = [r for r in rows if int(r["distance"]) == d]
        assert agg["mean_entropy"][d - 1] == pytest.approx(
            np.mean([float(r["entropy"]) for r in at]), rel=1e-4)
        assert agg["share_generic"][d - 1] == pytest.approx(
            np.mean([r["top1_category"] != "other" for r in at]))
        assert agg["distinct_top1"][d - 1] == len({r["top1_id"] for r in at})
        assert agg["median_top1_rank"][d - 1] == np.median([int(r["top1_rank"]) for r in at])
    assert (summary["num_prompts"], summary["num_masks"]) == (len(PROMPTS), NUM_MASKS)
    assert summary["near"]["mean_entropy"] == pytest.approx(np.mean(agg["mean_entropy"][:8]))
    assert set(summary["files"]) == {"table", "aggregates", "heatmap", "plot"}


def test_too_many_masks_is_an_error_naming_the_room(probed, tmp_path, capsys):
    model, _, _ = probed
    assert main(["probe", "--model", model.path, "--num-masks", "1000",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--num-masks between 1 and" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_chat_prompts_go_through_the_template(tmp_path):
    model = jdlm.load(save_tiny_text_model(tmp_path / "chat", chat=True))
    out = tmp_path / "out"
    assert main(["probe", "--model", model.path, "--chat", "--num-masks", "8", "--corpus",
                 "pydocs", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    tok = model.tokenizer
    rendered = [f"<|bos|>user: {p}\nassistant:" for p in DEFAULT_PROMPTS]
    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in rendered]
    assert summary["prompt_lengths"] == [len(i) for i in ids]
    assert summary["corpus"] == "pydocs"
    with (out / "positions.csv").open() as f:
        first = [r for r in csv.DictReader(f) if r["prompt_index"] == "0"]
    _, probs, _ = _reference(model, ids[0], 8)
    np.testing.assert_allclose([float(r["top1_prob"]) for r in first], probs[:, 0], rtol=1e-4)


def test_chat_without_a_template_is_an_error(probed, tmp_path, capsys):
    assert main(["probe", "--model", probed[0].path, "--chat", "--out", str(tmp_path)]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_token_categories():
    special = {3}
    assert token_category("<|eos|>", 3, special) == "special"
    assert token_category("\n\n", 7, special) == "whitespace"
    assert token_category(" ,", 7, special) == "punctuation"
    assert token_category(" The", 7, special) == "function_word"
    assert token_category(" statement", 7, special) == "other"


def test_read_prompts_formats(tmp_path):
    from jdlm.eval.probe import read_prompts

    rows = [{"prompt": "a"}, {"text": "b"}, {"conversations": ["c", "answer"], "source": "x"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b", "c"]
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert read_prompts(tmp_path / "p.txt") == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(jdlm.JdlmError, match="lines \\[1\\]"):
        read_prompts(tmp_path / "bad.jsonl")
