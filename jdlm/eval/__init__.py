"""Evaluation: HumanEval, GSM8K, MAUVE, judge NLL, exact metrics on synthetic languages, speed,
sample-and-score runs (`benchmark`), the lm-eval model adapter and the position probe."""
