"""The committed embedded default (`checkpoints/tiny-pydocs`) loads and runs end to end."""

import json
from pathlib import Path

import numpy as np

import jdlm
from jdlm.cli import main as cli

TINY = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-pydocs"


def test_tiny_pydocs_loads_with_its_tokenizer():
    model = jdlm.load(TINY)
    meta = json.loads((TINY / "jdlm.json").read_text())
    assert meta["objective"] == "mdlm" and model.config.family == "llada"
    ids = model.tokenizer("The with statement", add_special_tokens=False)["input_ids"]
    assert model.tokenizer.decode(ids) == "The with statement"
    logits = np.asarray(model.logits(np.array([ids])))
    assert logits.shape == (1, len(ids), model.config.vocab_size) and np.isfinite(logits).all()


def test_probe_on_tiny_pydocs_writes_the_table_and_both_plots(tmp_path):
    assert cli(["probe", "--model", str(TINY), "--out", str(tmp_path), "--num-masks", "32"]) == 0
    for name in ("positions.csv", "aggregates.json", "summary.json", "heatmap.png",
                 "aggregates.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    aggregates = json.loads((tmp_path / "aggregates.json").read_text())
    assert len(next(iter(v for v in aggregates.values() if isinstance(v, list)))) == 32


def test_jdlm_featurizer_is_the_last_token_state_of_a_causal_pass():
    from jdlm.eval.mauve import get_featurizer

    featurize = get_featurizer(f"jdlm:{TINY}")
    texts = ["The with statement", "Lambda expressions create anonymous functions."]
    feats = featurize(texts)
    model = jdlm.load(TINY)
    ids = [model.config.bos_token_id] + model.tokenizer(texts[1], add_special_tokens=False)["input_ids"]
    _, hidden = model.logits_and_hidden(np.array([ids]), causal=True)
    assert feats.shape == (2, model.config.hidden_size)
    np.testing.assert_allclose(feats[1], np.asarray(hidden)[0, -1], atol=1e-5)
