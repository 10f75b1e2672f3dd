"""GSM8K prompt, extraction and scoring on the real test set and model-style outputs."""

import json
from pathlib import Path

import pytest

from jdlm.errors import JdlmError
from jdlm.eval.gsm8k import (
    COT_EXEMPLARS,
    chat_messages,
    cot_prompt,
    extract_answer,
    load_split,
    score,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def _gold(solution: str) -> str:
    return str(int(solution.split("####")[-1].strip().replace(",", "")))


def test_extraction_of_every_reference_solution_is_exact():
    rows = load_split("test", DATA)
    assert len(rows) == 1319
    result = score([{"question": r["question"], "output": r["answer"]} for r in rows], rows)
    assert result == {"accuracy": 1.0, "correct": 1319, "total": 1319}
    # The same solutions written the way the 8-shot prompt teaches ("The answer is N.").
    restyled = [{"output": r["answer"].split("####")[0] + "The answer is "
                 + r["answer"].split("####")[1].strip() + ".", "answer": _gold(r["answer"])}
                for r in rows]
    assert score(restyled)["accuracy"] == 1.0


@pytest.mark.parametrize("output,expected", [
    ("Janet has 16 - 3 - 4 = 9 eggs. She sells them for $2 each, 9 * 2 = 18. The answer is 18.",
     "18"),
    ("The answer is $1,234.50.\n\nQ: Tom has 7 apples and eats 2. How many are left?\nA: 5",
     "1234.5"),
    ("Step 1: 3 boxes of 12 is 36.\nStep 2: 36 - 40 = -4.\nThe answer is -4 degrees", "-4"),
    ("He earns 2,000 dollars a month, 12 months: 24,000. The answer is: **24,000** dollars.",
     "24000"),
    ("First 0.5 * 7 = 3.5 hours, then 3.5 + 1.25 = 4.75. So the total is 4.75 hours.", "4.75"),
    ("#### 72\nThe answer is 5", "72"),
    ("So 4 + 4 = 8. The answer is 8.\n\nQuestion: Sam has 3 pens. The answer is 3.", "8"),
    ("She had 10 cookies, gave away 4 and has 6 left, so the answer is 6 cookies; 3 friends.",
     "6"),
    ("The answer is 18.00.", "18"),
    ("I cannot solve this.", None),
])
def test_model_style_outputs(output, expected):
    assert extract_answer(output) == expected


def test_scoring_log_and_gold_sources(tmp_path):
    rows = load_split("test", DATA)[:3]
    preds = [
        {"question": rows[0]["question"], "output": "... The answer is 18."},  # gold from data
        {"question": "  " + rows[1]["question"] + " ", "output": "The answer is 4."},  # wrong
        {"question": "made up", "output": "so 7 in total. The answer is 7.", "answer": 7},
    ]
    log = tmp_path / "log.jsonl"
    result = score(preds, rows, log_path=log)
    assert result == {"accuracy": pytest.approx(2 / 3), "correct": 2, "total": 3}
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["gold"], r["predicted"], r["correct"]) for r in lines] == [
        ("18", "18", True), ("3", "4", False), ("7", "7", True)]


def test_prompts():
    prompt = cot_prompt("How many legs do 3 cats have?")
    assert prompt.count("Q: ") == 9 and prompt.count("The answer is") == 8
    assert prompt.startswith("Q: There are 15 trees in the grove.")
    assert prompt.endswith("Q: How many legs do 3 cats have?\nA:")
    assert "\n\nQ: If there are 3 cars" in prompt
    assert [extract_answer(a) for _, a in COT_EXEMPLARS] == ["6", "5", "39", "8", "9", "29",
                                                             "33", "8"]
    assert cot_prompt("x", shots=0) == "Q: x\nA:"
    messages = chat_messages("How many legs do 3 cats have?")
    assert messages[0]["role"] == "user" and messages[0]["content"].endswith("3 cats have?")


def test_user_errors(tmp_path, monkeypatch):
    with pytest.raises(JdlmError, match="--data"):
        load_split("test", tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(JdlmError, match="--data"):
        load_split("test")
    with pytest.raises(JdlmError, match="not in the reference set"):
        score([{"question": "unknown", "output": "1"}], [])


def test_non_numeric_answer_is_an_error():
    with pytest.raises(JdlmError, match="not a number"):
        score([{"output": "The answer is 3.", "answer": "three"}])
