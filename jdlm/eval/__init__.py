"""Evaluation: HumanEval, GSM8K, MAUVE, judge NLL, exact metrics on synthetic languages, speed."""
