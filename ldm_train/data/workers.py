"""DataLoader worker processes leave preemption signals to the main process.

Schedulers signal a whole job: SLURM sends SIGTERM (and SIGUSR1 with --signal) to every process of
it, a terminal's Ctrl-C and `kill -- -PGID` reach the whole process group. A loader worker killed by
one (torch's worker handler re-raises SIGTERM) makes the main process fail with "DataLoader worker
is killed by signal" before it can save a checkpoint. So workers ignore these signals; the main
process finishes its step, checkpoints (callbacks/preemption.py) and shuts the workers down.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal

from lightning.fabric.utilities.seed import pl_worker_init_function

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def init_worker(worker_id: int, rank: int = 0) -> None:
    """The loaders' worker_init_fn: ignore preemption signals; then seed the worker's global RNGs
    as Lightning's own worker_init_fn does (it adds it only where none is set)."""
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank=rank)


def kill_worker_processes() -> None:
    """SIGKILL this process's daemonic multiprocessing children (the loader workers left alive).

    multiprocessing ends daemonic children at exit with SIGTERM, then waits for them: a worker
    that ignores SIGTERM and is stuck (e.g. reading a hung network shard) would make the exit wait
    forever. Workers that are not stuck are gone by then (Lightning shuts them down at the end of
    fit); this only ends those that would not end otherwise.
    """
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


_registered = False


def kill_workers_at_exit() -> None:
    """Register kill_worker_processes to run at exit, before multiprocessing's own exit handler
    (atexit runs the last registered first); once per process."""
    global _registered
    if not _registered:
        atexit.register(kill_worker_processes)
        _registered = True
