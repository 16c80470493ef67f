"""A fork server for the tests' CLI runs: `python -m MODULE ARGS` in a process forked from one that
has already imported torch, Lightning, diffusers, open_clip, transformers and ldm_train.

A fresh interpreter spends about 9 s of CPU importing those before the CLI reads its first
argument; the tests start about a hundred CLI runs, so that was half of `make test`. A forked
child is still a process of its own (its own exit code, signals, working directory, environment
and output files; kill -9 kills only it), and Lightning's DDP launcher still starts its other
ranks as fresh interpreters. What a fork cannot show is what happens while importing (a library's
warning at import time): conftest's run_cli starts a fresh interpreter for runs that set their
own environment variables (read at import time by some libraries) and when asked (fresh=True).

Protocol, one JSON object per line: the client writes {"args", "cwd", "env", "out", "err",
"returncode", "new_session"} (err may be out: one file for both); the server forks, answers
{"pid"} and writes the run's return code (negative: killed by that signal) into the file named
"returncode" when the run ends. Several runs may go at once (the ranks of one job).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import runpy
import signal
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


def child(request: dict) -> int:
    """In the forked process: become `python -m MODULE ARGS` in the request's place; its code."""
    if request.get("new_session"):
        os.setsid()  # a process group of its own, as Popen(start_new_session=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    written = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], written)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    if request["err"] == request["out"]:
        os.dup2(1, 2)  # stderr into stdout, one offset: as Popen(stderr=STDOUT)
    else:
        opened = os.open(request["err"], written)
        os.dup2(opened, 2)
        os.close(opened)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
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


def run_child(request: dict) -> None:
    """The forked process's whole life: run, then the interpreter's own shutdown steps."""
    code = 1
    try:
        code = child(request)
        atexit._run_exitfuncs()  # what the interpreter runs at exit (e.g. wandb's finish)
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def reap(pid: int, path: str) -> None:
    """Waits for the run and writes its return code (whole, by a rename)."""
    _, status = os.waitpid(pid, 0)
    with open(f"{path}.part", "w") as file:
        file.write(str(os.waitstatus_to_exitcode(status)))
    os.replace(f"{path}.part", path)


def serve() -> None:
    for name in WARM:
        __import__(name)
    answers = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write into the answers
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request)
        threading.Thread(target=reap, args=(pid, request["returncode"]), daemon=True).start()
        print(json.dumps({"pid": pid}), file=answers, flush=True)


if __name__ == "__main__":
    serve()
