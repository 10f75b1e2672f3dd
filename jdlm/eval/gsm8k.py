"""GSM8K: the 8-shot chain-of-thought prompt, a 0-shot chat prompt, answer extraction, accuracy.

The exemplars are the eight of Wei et al. 2022 (Table 20) as lm-eval's `gsm8k_cot` uses them:
"Q: ...\\nA: ... The answer is N." blocks joined by a blank line, generation stopped at "Q:".
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from jdlm.errors import JdlmError
from jdlm.eval.jsonl import read_jsonl, write_jsonl_atomic

HF_DATASET = ("openai/gsm8k", "main")
STOP_STRINGS = ("Q:", "</s>", "<|im_end|>")

COT_EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After "
     "they are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So "
     "there must have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the "
     "parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they "
     "have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
     "After eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many "
     "lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave "
     "Denny 20 - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many "
     "toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more "
     "toys. 5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, "
     "from monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So "
     "5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 "
     "more. How many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After "
     "losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has "
     "23 - 15 dollars left. 23 - 15 is 8. The answer is 8."),
]

ZERO_SHOT_INSTRUCTION = ("Solve the following math problem step by step. End your response with "
                         "\"The answer is N.\" where N is the final number.")


def cot_prompt(question: str, shots: int = 8) -> str:
    """The few-shot chain-of-thought prompt ending in "A:" for the model to continue."""
    if not 0 <= shots <= len(COT_EXEMPLARS):
        raise JdlmError(f"shots={shots}: choose between 0 and {len(COT_EXEMPLARS)}")
    blocks = [f"Q: {q}\nA: {a}" for q, a in COT_EXEMPLARS[:shots]]
    return "\n\n".join(blocks + [f"Q: {question.strip()}\nA:"])


def chat_messages(question: str) -> list[dict]:
    """The 0-shot chat variant: one user turn, for a tokenizer's `apply_chat_template`."""
    return [{"role": "user", "content": f"{ZERO_SHOT_INSTRUCTION}\n\n{question.strip()}"}]


# -- answer extraction -----------------------------------------------------------------------

_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+"
_HASHES = re.compile(r"####\s*(" + _NUMBER + ")")
# Filler a model puts between "the answer is" and the number: colon, bold, LaTeX box, "$".
_ANSWER_IS = re.compile(r"answer is[\s:*_\\{(\[$]*(?:boxed\{)?\s*(" + _NUMBER + ")", re.I)
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: str) -> str | None:
    """"$1,234.50" -> "1234.5", "18.00" -> "18", "-3" -> "-3"; None if not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(output: str) -> str | None:
    """The final numeric answer of a model output (or a GSM8K reference solution), normalized.

    In order: "#### N" (the dataset's own format), the last "The answer is N", the last number.
    Text after a new "Q:" or "Question:" is dropped first: that is the model writing another
    exemplar.
    """
    output = re.split(r"\n\s*(?:Q|Question):", output, maxsplit=1)[0]
    for pattern in (_HASHES, _ANSWER_IS):
        found = pattern.findall(output)
        if found:
            return normalize_number(found[0] if pattern is _HASHES else found[-1])
    numbers = _ANY_NUMBER.findall(output)
    return normalize_number(numbers[-1]) if numbers else None


def reference_answer(solution: str) -> str:
    """The gold number of a GSM8K reference solution (the text after "####")."""
    if "####" not in solution:
        raise JdlmError(f"not a GSM8K reference solution (no '####'): {solution[:80]!r}")
    return normalize_number(solution.split("####")[-1].strip())


# -- data and scoring ------------------------------------------------------------------------


def load_split(split: str = "test", path: str | Path | None = None) -> list[dict]:
    """[{question, answer}] from a JSONL file, a directory holding `<split>.jsonl`, or the hub."""
    if path is not None:
        path = Path(path)
        file = path / f"{split}.jsonl" if path.is_dir() else path
        if not file.is_file():
            raise JdlmError(f"GSM8K data {file} does not exist; pass --data pointing at the "
                            f"{split}.jsonl of openai/grade-school-math or its directory")
        return read_jsonl(file)
    try:
        import datasets

        rows = datasets.load_dataset(*HF_DATASET, split=split)
    except Exception as err:  # offline, no `datasets`, or the hub refused
        raise JdlmError(f"could not load {HF_DATASET[0]} from the Hugging Face hub ({err}); "
                        f"pass --data PATH (a directory with {split}.jsonl, or the file)") from None
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def score(predictions: list[dict], reference: list[dict] | None = None,
          log_path: str | Path | None = None) -> dict:
    """Accuracy of `[{question, output[, answer]}]`.

    A prediction's gold answer is its own `answer` (a number or a reference solution) or, when
    absent, the answer of the same question in `reference`. `log_path` gets one line per
    question: question, gold, predicted, correct, output.
    """
    if not predictions:
        raise JdlmError("no predictions to score: the predictions file is empty")
    by_question = {_key(r["question"]): r["answer"] for r in reference or []}
    rows = []
    for i, p in enumerate(predictions):
        if "output" not in p:
            raise JdlmError(f"prediction {i} has no 'output' field: {sorted(p)}")
        gold = p.get("answer")
        if gold is None:
            gold = by_question.get(_key(p.get("question", "")))
        if gold is None:
            raise JdlmError(f"prediction {i}: question {p.get('question', '')[:60]!r} is not in "
                            "the reference set and has no 'answer' field; add one or pass the "
                            "matching --data")
        gold = str(gold)
        gold = reference_answer(gold) if "####" in gold else normalize_number(gold)
        if gold is None:
            raise JdlmError(f"prediction {i}: answer {p.get('answer')!r} is not a number")
        predicted = extract_answer(p["output"])
        rows.append({"question": p.get("question"), "gold": gold, "predicted": predicted,
                     "correct": predicted is not None and predicted == gold,
                     "output": p["output"]})
    if log_path is not None:
        write_jsonl_atomic(log_path, rows)
    correct = sum(r["correct"] for r in rows)
    return {"accuracy": correct / len(rows), "correct": correct, "total": len(rows)}


def _key(question: str) -> str:
    return " ".join(question.split())
