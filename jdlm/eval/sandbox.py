"""Run untrusted Python (model-written code) in a contained subprocess.

Layers, strongest first:
* as root: a fresh network namespace (no interfaces but a down loopback, so nothing is
  reachable) and a fresh PID namespace whose init is the program, so every process it forks dies
  with it; the program runs under a random unprivileged uid (keeping only the capability to read
  files), so it can write nowhere but its directory and world-writable places, and
  RLIMIT_NPROC counts only its own processes;
* always: rlimits on address space, process count, CPU seconds, file size and open files; a new
  session whose whole process group is SIGKILLed on timeout; a fresh temporary working
  directory; an audit hook that refuses socket creation and writes outside that directory.

This file is executed by path as the child's entry point, so its top level imports only the
standard library (importing the `jdlm` package would pull in JAX).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
CAP_DAC_READ_SEARCH = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Random uids from this range are unlikely to be anyone's: concurrent sandboxes never share one.
SANDBOX_UIDS = range(200_000, 2_000_000_000)
STOP_GRACE_S = 1.0


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    memory_bytes: int = 2 * 2**30
    max_processes: int = 32
    max_file_bytes: int = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None when killed on timeout
    timed_out: bool
    output: str  # stdout and stderr together, the last 4 kB
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run_python(program: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `program` (Python source) contained; passed means it exited 0 within the time limit."""
    from jdlm.errors import JdlmError

    if limits.timeout_s <= 0 or limits.memory_bytes <= 0 or limits.max_processes < 1:
        raise JdlmError(f"{limits}: time, memory and process limits must be positive")
    workdir = tempfile.mkdtemp(prefix="jdlm-sandbox-")
    uid = random.choice(SANDBOX_UIDS) if os.geteuid() == 0 else None
    try:
        with open(os.path.join(workdir, "program.py"), "w") as f:
            f.write(program)
        if uid is not None:
            os.chown(workdir, uid, uid)
        config = {"workdir": workdir, "uid": uid, **dataclasses.asdict(limits)}
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        with tempfile.TemporaryFile() as out:  # a file, not a pipe: stray children cannot hang us
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__),
                                     json.dumps(config)], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=workdir, env=env,
                                    start_new_session=True)
            try:
                returncode, timed_out = proc.wait(timeout=limits.timeout_s), False
            except subprocess.TimeoutExpired:
                returncode, timed_out = None, True
            finally:
                _stop(proc)
            wall = time.monotonic() - start
            out.seek(max(0, out.seek(0, os.SEEK_END) - 4096))
            output = out.read().decode("utf-8", "replace")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return SandboxResult(returncode, timed_out, output, wall)


def check_sandbox(limits: SandboxLimits = SandboxLimits()) -> None:
    """Raise if a trivial program cannot run: a broken sandbox must not read as failing code."""
    from jdlm.errors import JdlmError

    res = run_python("print('ok')\n", limits)
    if not res.passed or res.output.strip() != "ok":
        raise JdlmError("the sandbox cannot run Python on this machine ("
                        f"{res.output.strip()[-500:]}); as root it needs "
                        "unshare(CLONE_NEWNET|CLONE_NEWPID), setuid and capset")


def _stop(proc: subprocess.Popen) -> None:
    """Ask the entry process to stop its namespace, then SIGKILL whatever is left of its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader; kill it regardless
    except ProcessLookupError:
        pass
    proc.wait()


# -- the child side (runs in the sandboxed process) ------------------------------------------


def _child_main(config: dict) -> None:
    workdir, uid = config["workdir"], config["uid"]
    if uid is not None:
        _enter_namespaces(uid)
    else:  # not root: RLIMIT_NPROC counts all of this user's processes, so allow for them
        config["max_processes"] += _count_own_processes()
    _set_limits(config)
    os.chdir(workdir)
    sys.addaudithook(_make_guard(os.path.realpath(workdir)))
    path = os.path.join(workdir, "program.py")
    with open(path) as f:
        source = f.read()
    sys.argv = [path]
    exec(compile(source, path, "exec"), {"__name__": "__main__", "__file__": path})


def _enter_namespaces(uid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET | CLONE_NEWPID) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET | CLONE_NEWPID) failed")
    pid = os.fork()
    if pid:  # this process stays outside the new PID namespace and relays the exit status
        # Asked to stop, it kills the namespace's init and reaps it, so no zombie is left for the
        # system's init to collect; the kernel kills everything else in the namespace.
        signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    # PID 1 of the new namespace: when it dies the kernel kills every process it left behind.
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setgroups([])
    os.setgid(uid)
    # Keep one capability, reading and searching any directory, because the interpreter may live
    # under a directory only root can enter (pyenv in /root); writing stays as the unknown uid.
    libc.prctl(PR_SET_KEEPCAPS, 1)
    os.setuid(uid)
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    keep = 1 << CAP_DAC_READ_SEARCH
    data = (ctypes.c_uint32 * 6)(keep, keep, 0, 0, 0, 0)  # effective, permitted, inheritable x2
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid binary can hand privileges back


def _count_own_processes() -> int:
    uid, count = os.getuid(), 0
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid:
                count += len(os.listdir(f"/proc/{name}/task"))  # NPROC counts threads
        except OSError:
            pass
    return count


def _set_limits(config: dict) -> None:
    cpu = int(config["timeout_s"]) + 1  # a backstop; the parent's wall-clock kill comes first
    for kind, value in [(resource.RLIMIT_AS, config["memory_bytes"]),
                        (resource.RLIMIT_NPROC, config["max_processes"]),
                        (resource.RLIMIT_CPU, cpu),
                        (resource.RLIMIT_FSIZE, config["max_file_bytes"]),
                        (resource.RLIMIT_NOFILE, 256),
                        (resource.RLIMIT_CORE, 0)]:
        resource.setrlimit(kind, (value, value))


def _make_guard(workdir: str):
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    mutating = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.symlink", "os.link",
                "os.chmod", "os.chown", "os.truncate", "os.utime", "shutil.rmtree"}
    two_paths = {"os.rename", "os.symlink", "os.link"}

    def inside(path) -> bool:
        if isinstance(path, int):  # an already-open descriptor
            return True
        real = os.path.realpath(os.fsdecode(path))
        return real == "/dev/null" or real == workdir or real.startswith(workdir + os.sep)

    def guard(event: str, args: tuple) -> None:
        if event == "socket.__new__":
            raise PermissionError("network access is disabled in the sandbox")
        if event == "open" and args[2] & write_flags and not inside(args[0]):
            raise PermissionError(f"writing outside the sandbox directory: {args[0]!r}")
        paths = args[:2] if event in two_paths else args[:1]
        if event in mutating and not all(inside(p) for p in paths):
            raise PermissionError(f"{event} outside the sandbox directory: {args[0]!r}")

    return guard


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
