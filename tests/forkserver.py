"""A fork server for the tests' CLI runs: `python -m MODULE ARGS` in a process forked from one that
has already imported torch, Lightning, diffusers, open_clip, transformers and ldm_train.

A fresh interpreter spends about 9 s of CPU importing those before the CLI reads its first
argument; the tests start about a hundred CLI runs, so that was half of `make test`. A forked
child is still a process of its own (its own exit code, signals, working directory, environment
and output files; kill -9 kills only it). What a fork cannot show is what happens while importing
(a library's warning at import time): conftest's run_cli starts a fresh interpreter for runs that
set HOME or PYTHONPATH (read while importing) and when asked (fresh=True).

The processes a run starts in its turn as `python [-u] -m MODULE ARGS` (the other ranks that
Lightning's DDP launcher starts, torchrun's workers, the gpu-check's children) are forked too: each
run keeps a standby, a fork of itself taken before it ran anything, which becomes such a child on
request (Standby). The child is still the run's own child, in its process group (unless it asked
for a session of its own), with the file descriptors, environment and working directory Popen gave
it, so Popen's wait, poll, signals and pipes work as with exec; what Popen cannot hand over
(preexec_fn, pass_fds, another user or interpreter, a HOME or PYTHONPATH that would import
differently) still starts a fresh interpreter. What importing reads from the environment and
differs between the ranks of one job (Lightning's rank) is read again in each forked child.

Protocol, one JSON object per line: the client writes {"args", "cwd", "env", "out", "err",
"returncode", "new_session"} (err may be out: one file for both); the server forks, answers
{"pid"} and writes the run's return code (negative: killed by that signal) into the file named
"returncode" when the run ends. Several runs may go at once (the ranks of one job).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import logging
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
import traceback

WARM = [
    "torch",
    "lightning",
    "diffusers",
    "open_clip",
    "transformers",
    "ldm_train.__main__",
    "ldm_train.chain",
    "ldm_train.generate",
    "ldm_train.evaluate",
    "ldm_train.export",
    "ldm_train.cache_latents",
]
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def child(request: dict, fds: list[int]) -> int:
    """In a forked process: become `python [-u] -m MODULE ARGS` in the request's place, with fds as
    its stdin, stdout and stderr; its exit code."""
    if request.get("new_session"):
        os.setsid()  # a process group of its own, as Popen(start_new_session=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for target, fd in enumerate(fds):
        if fd != target:
            os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:
        os.close(fd)
    reread_environment()
    Standby.start()  # before this run does anything: its own children fork from here
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    for name, fd in (("stdout", 1), ("stderr", 2)):  # line-buffered; -u: written through
        stream = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115
        stream.reconfigure(write_through=request.get("unbuffered", False))
        setattr(sys, name, stream)
    for signum in (signal.SIGTERM, signal.SIGUSR1):  # a fresh interpreter's handlers
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    paths = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [p for p in paths if p not in sys.path]
    module, *argv = request["args"][1:]
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what a fresh interpreter prints, and its code
        traceback.print_exc()
        code = 1
    return code


def reread_environment() -> None:
    """What importing reads from the environment, which a fork would take from the server's: the
    process's rank for Lightning's rank_zero_only (RANK, LOCAL_RANK, SLURM_PROCID, ...)."""
    from lightning.fabric.utilities.rank_zero import _get_rank, rank_zero_only

    rank_zero_only.rank = _get_rank() or 0


def run_child(request: dict, fds: list[int]) -> None:
    """The forked process's whole life: run, then the interpreter's own shutdown steps."""
    code = 1
    try:
        code = child(request, fds)
        atexit._run_exitfuncs()  # what the interpreter runs at exit (e.g. wandb's finish)
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


class Standby:
    """A run's standby: a fork of the run taken before it ran anything, waiting on a socket. Asked
    to start `python -m ...`, it forks that child and a new standby, and exits; the run adopts
    both (it is their subreaper), so the child is the run's own. One per process (start)."""

    current: Standby | None = None
    lock = threading.Lock()  # one request at a time (several threads may start children)

    def __init__(self, pid: int, channel: socket.socket):
        self.pid, self.channel = pid, channel

    @classmethod
    def start(cls) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            wait_as_standby(theirs)
        theirs.close()
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        cls.current = cls(pid, ours)

    def hand_over(self, request: dict, fds: list[int]) -> int | None:
        """The pid of the child the standby became, or None if it is gone (then: exec)."""
        with self.lock:
            try:
                socket.send_fds(self.channel, [json.dumps(request).encode()], fds)
                answer = self.channel.recv(4096)
            except OSError:
                answer = b""
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)  # it has exited: its two children are ours now
            if not answer:
                Standby.current = None
                return None
            started = json.loads(answer)
            self.pid = started["standby"]
            return started["pid"]


def wait_as_standby(channel: socket.socket) -> None:
    """The standby's life: on a request, fork the child and the next standby, answer and exit;
    when the run has ended (its end of the socket closed), exit."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # hold none of the run's pipes open
        os.dup2(devnull, fd)
    try:
        while True:
            message, fds, _, _ = socket.recv_fds(channel, 1 << 20, 3)
            if not message:
                return
            pid = os.fork()
            if pid == 0:
                channel.close()
                run_child(json.loads(message), fds)
            for fd in fds:
                os.close(fd)
            successor = os.fork()
            if successor:
                channel.send(json.dumps({"pid": pid, "standby": successor}).encode())
                return
            # the successor: the run's standby from here on
    finally:
        os._exit(0)


def python_module_request(args, executable, cwd, env) -> dict | None:
    """What a standby needs to become `args`, or None where it cannot honestly: not this
    interpreter with [-u] -m MODULE, or a HOME or module path other than what was imported with."""
    args = [os.fsdecode(a) for a in args]
    unbuffered = args[1:2] == ["-u"]
    rest = args[1 + unbuffered :]
    module = rest[:1] == ["-m"] and len(rest) > 1
    if executable not in (None, args[0]) or args[0] != sys.executable or not module:
        return None
    env = dict(
        os.environ if env is None else {os.fsdecode(k): os.fsdecode(v) for k, v in env.items()}
    )
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if env.get("HOME") != os.environ.get("HOME") or not set(paths) <= set(sys.path):
        return None
    return {
        "args": rest,
        "cwd": os.fspath(cwd) if cwd is not None else os.getcwd(),
        "env": env,
        "unbuffered": unbuffered,
    }


_exec_child = subprocess.Popen._execute_child


def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, *rest):
    """Popen's start of a child, through the standby where it can be (see the module docstring)."""
    _, _, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite = rest[:9]
    gid, gids, uid, umask, start_new_session, *process_group = rest[10:]  # 3.11+: process_group
    plain = not (shell or preexec_fn or pass_fds or isinstance(args, (str, bytes)))
    as_we_are = (gid, gids, uid) == (None, None, None) and umask < 0 and process_group in ([], [-1])
    request = None
    if Standby.current and plain and as_we_are:
        request = python_module_request(list(args), executable, cwd, env)
    pid = None
    if request is not None:
        ends = zip((p2cread, c2pwrite, errwrite), (0, 1, 2), strict=True)
        request["new_session"] = bool(start_new_session)
        pid = Standby.current.hand_over(request, [end if end != -1 else own for end, own in ends])
    if pid is None:
        return _exec_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, *rest)
    self.pid, self._child_created = pid, True
    self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)
    return None


def reap(pid: int, path: str) -> None:
    """Waits for the run and writes its return code (whole, by a rename)."""
    _, status = os.waitpid(pid, 0)
    with open(f"{path}.part", "w") as file:
        file.write(str(os.waitstatus_to_exitcode(status)))
    os.replace(f"{path}.part", path)


def open_outputs(request: dict) -> list[int]:
    """The run's stdin (nothing), stdout and stderr (one file for both when they are the same)."""
    written = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    out = os.open(request["out"], written)
    err = out if request["err"] == request["out"] else os.open(request["err"], written)
    return [os.open(os.devnull, os.O_RDONLY), out, err]


def serve() -> None:
    for name in WARM:
        __import__(name)
    subprocess.Popen._execute_child = _execute_child  # only forked runs have a Standby.current
    answers = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write into the answers
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request, open_outputs(request))
        threading.Thread(target=reap, args=(pid, request["returncode"]), daemon=True).start()
        print(json.dumps({"pid": pid}), file=answers, flush=True)


if __name__ == "__main__":
    serve()
