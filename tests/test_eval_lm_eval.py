"""`lm_eval --model jdlm` end to end, offline, on local JSONL tasks: a generation task, a
multiple-choice (loglikelihood) task and a perplexity (loglikelihood_rolling) task.

The adapter's job is routing lm-eval's requests to jdlm, so the references are jdlm's own
`generate` / `log_likelihood` / `log_likelihood_rolling` called directly on the same tokens."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_text_model import save_tiny_text_model

import jdlm
from jdlm.diffusion import log_likelihood, log_likelihood_rolling
from jdlm.eval.benchmark import cut_at_stop_strings
from jdlm.eval.lm_eval_adapter import JdlmLM

GEN = [{"question": "Q: What does the for statement do?\nA:", "answer": "loops"},
       {"question": "Q: Name a built-in type.\nA:", "answer": "int"},
       {"question": "The with statement", "answer": "x"}]
MC = [{"question": "The keyword that defines a function is", "choices": ["def", "class"],
       "label": 0},
      {"question": "A loop over items uses", "choices": ["for", "while", "if"], "label": 0}]
DOCS = [{"text": "The for statement is used to iterate over the elements of a sequence."}]
MODEL_ARGS = {"gen_length": 16, "steps": 8, "block_length": 8, "temperature": 0.5, "seed": 3,
              "mc_num": 8, "mc_batch_size": 4}


def _task(dir_: Path, name: str, rows: list[dict], body: str) -> None:
    data = dir_ / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (dir_ / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One `python -m jdlm.eval.lm_eval_adapter` run over three local tasks."""
    root = tmp_path_factory.mktemp("lm_eval")
    model = save_tiny_text_model(root / "model")
    tasks = root / "tasks"
    tasks.mkdir()
    _task(tasks, "jdlm_tiny_gen", GEN,
          'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
          'generation_kwargs:\n  until: ["\\n", "Q:"]\nmetric_list:\n  - metric: exact_match\n')
    _task(tasks, "jdlm_tiny_mc", MC,
          'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
          'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n')
    _task(tasks, "jdlm_tiny_ppl", DOCS,
          'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
          'metric_list:\n  - metric: word_perplexity\n')
    out = root / "out"
    args = ",".join([f"path={model}"] + [f"{k}={v}" for k, v in MODEL_ARGS.items()])
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(root / "hf-cache"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "jdlm.eval.lm_eval_adapter", "--model", "jdlm",
         "--model_args", args, "--tasks", "jdlm_tiny_gen,jdlm_tiny_mc,jdlm_tiny_ppl",
         "--include_path", str(tasks), "--batch_size", "2", "--output_path", str(out),
         "--log_samples"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    samples = {}
    for f in out.rglob("samples_*.jsonl"):
        task = f.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in f.read_text().splitlines()]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    return jdlm.load(model), samples, results


def greedy_one_per_pass(model, context: list[int], n: int) -> list[int]:
    """LLaDA's `suffix_greedy_prediction` in numpy: n passes, each revealing the masked position
    whose argmax is most probable (the mask token itself is never a candidate)."""
    mask = model.config.mask_token_id
    seq = np.array(context + [mask] * n)
    for _ in range(n):
        logits = np.asarray(model.logits(seq[None]))[0].astype(np.float64)
        logits[:, mask] = -np.inf
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        masked = np.flatnonzero(seq == mask)
        best = masked[np.argmax(probs[masked].max(-1))]
        seq[best] = probs[best].argmax()
    return [int(t) for t in seq[len(context):]]


def test_generate_until_is_jdlm_generate_cut_at_until(run):
    model, samples, results = run
    rows = sorted(samples["jdlm_tiny_gen"], key=lambda s: s["doc_id"])
    assert [r["doc"]["question"] for r in rows] == [g["question"] for g in GEN]
    tok = model.tokenizer
    config = jdlm.SamplerConfig(gen_length=16, steps=8, block_length=8, temperature=0.5)
    prompts = [tok(g["question"])["input_ids"] for g in GEN]
    # Request i gets seed + i, in batches of --batch_size 2 as the adapter runs them.
    tokens = [row for start in (0, 2) for row in jdlm.generate(
        model, prompts[start:start + 2], config,
        seed=[3 + start + i for i in range(len(prompts[start:start + 2]))])]
    expected = []
    for row in (t[-16:] for t in tokens):
        ids = [int(t) for t in row]
        ids = ids[:ids.index(model.config.eos_token_id)] if model.config.eos_token_id in ids \
            else ids
        expected.append(cut_at_stop_strings(tok.decode(ids, skip_special_tokens=True),
                                            ["\n", "Q:"]))
    got = [r["resps"][0][0] for r in rows]
    assert got == expected
    assert any(got), "every generation came out empty: nothing was compared"
    assert "exact_match,none" in results["results"]["jdlm_tiny_gen"]


def test_loglikelihood_is_the_monte_carlo_bound(run):
    model, samples, results = run
    tok = model.tokenizer
    rows = sorted(samples["jdlm_tiny_mc"], key=lambda s: s["doc_id"])
    assert len(rows) == len(MC)
    for row, doc in zip(rows, MC):
        assert len(row["resps"]) == len(doc["choices"])
        for i, ((resp,), choice) in enumerate(zip(row["resps"], doc["choices"])):
            logprob, is_greedy = float(resp[0]), resp[1]
            # lm-eval's request: (question, " " + choice); the adapter encodes the pair as
            # LLaDA's harness does, the answer being the tail of the whole string's encoding.
            args = row["arguments"][f"gen_args_{i}"]
            assert (args["arg_0"], args["arg_1"]) == (doc["question"], " " + choice)
            context = tok(doc["question"])["input_ids"]
            answer = tok(doc["question"] + " " + choice)["input_ids"][len(context):]
            want = log_likelihood(model, context, answer, mc_num=8, batch_size=4, seed=3)
            assert logprob == pytest.approx(want, rel=1e-5)
            assert logprob < 0
            assert is_greedy == str(greedy_one_per_pass(model, context, len(answer)) == answer)
    acc = results["results"]["jdlm_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0


def test_loglikelihood_rolling_is_the_chunked_bound(run):
    model, samples, results = run
    (row,) = samples["jdlm_tiny_ppl"]
    ids = model.tokenizer(DOCS[0]["text"], add_special_tokens=False)["input_ids"]
    want = log_likelihood_rolling(model, ids, prefix_ids=[model.config.bos_token_id],
                                  mc_num=8, batch_size=4, seed=3)
    assert float(row["resps"][0][0]) == pytest.approx(want, rel=1e-5)
    assert results["results"]["jdlm_tiny_ppl"]["word_perplexity,none"] > 1.0


def test_is_greedy_when_the_answer_is_the_greedy_decoding(run):
    model = run[0]
    lm = JdlmLM(path=model.path, gen_length=4)
    context = model.tokenizer("The for statement")["input_ids"]
    greedy = greedy_one_per_pass(model, context, 3)
    assert lm._is_greedy(context, greedy) is True
    other = greedy[:2] + [(greedy[2] + 1) % model.config.vocab_size]
    assert lm._is_greedy(context, other) is False
    assert JdlmLM(path=model.path, gen_length=4, greedy_check=False)._is_greedy(
        context, greedy) is False


def test_unknown_model_args_are_named(run):
    with pytest.raises(jdlm.JdlmError, match="stepz"):
        JdlmLM(path=run[0].path, stepz=4)


def test_chat_template_for_apply_chat_template(tmp_path):
    lm = JdlmLM(path=str(save_tiny_text_model(tmp_path / "chat", chat=True)), gen_length=4)
    turns = [{"role": "user", "content": "Name a loop."}]
    assert lm.apply_chat_template(turns) == "<|bos|>user: Name a loop.\nassistant:"
    assert lm.chat_template(True) == lm.tokenizer.chat_template
