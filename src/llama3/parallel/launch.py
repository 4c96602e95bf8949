"""The CLI under tensor parallelism: ``llama3 CMD --tp N ...`` or ``torchrun --nproc-per-node N -m llama3 CMD ...``.

Every rank parses the same command line. Rank 0 runs the command as usual (its model load goes through
``llama3.parallel.load``); the other ranks load their shard and replay rank 0's model calls until it
says stop. Exit status: rank 0's; non-zero on every rank when any failed.
"""

from __future__ import annotations

import os
import sys

from .runtime import (ParallelError, init, rank0_signals, spawn_ranks, worker_loop, worker_signals,
                      world_from_env)

COMMANDS = ("generate", "chat", "serve")  # the commands that run the engine (and so its torch decoder)


def main(ns, argv: list[str], run) -> int:
    """Run ``run()`` (the command) as rank 0, or this rank's share of it; ``argv`` to start ranks 1.. with."""
    _, world, _ = world_from_env()
    tp = getattr(ns, "tp", 1)
    if ns.command not in COMMANDS:
        raise ValueError(f"`llama3 {ns.command}` runs in one process; tensor parallelism is for {', '.join(COMMANDS)}")
    if world > 1 and tp not in (1, world):
        raise ValueError(f"--tp {tp} disagrees with WORLD_SIZE={world} set by the launcher (torchrun)")
    workers = spawn_ranks(tp, argv) if world == 1 else []
    try:
        session = init(ns.tp_timeout, ns.device)
    except BaseException as e:
        for p in workers:
            p.terminate()
        if isinstance(e, ParallelError):
            print(f"llama3 {ns.command}: error: {e}", file=sys.stderr)
            return 1
        raise
    session.workers = workers
    if session.rank > 0:
        return _worker(ns, session)
    rank0_signals()
    ns.tp_session = session
    code = 1
    try:
        code = run()
    except ParallelError as e:
        print(f"llama3 {ns.command}: error: {e}", file=sys.stderr)
    finally:
        status = session.close(code == 0)
    return code or status


def _worker(ns, session) -> int:
    from .loader import load

    worker_signals()
    try:
        model = load(session, ns.model, dtype=ns.dtype, quantize=ns.quantize, check=ns.check)
        if worker_loop(model, session) != 0:
            print(f"llama3 rank {session.rank}: stopping: rank 0 ended with an error or was interrupted", file=sys.stderr)
            return 1
        return session.close(True)
    except BaseException as e:  # noqa: BLE001 - reported to the other ranks, then this rank exits
        message = f"{type(e).__name__}: {e}"
        session.report(message)
        print(f"llama3 rank {session.rank}: error: {message}", file=sys.stderr, flush=True)
        os._exit(1)  # not a clean teardown: the groups may be mid-collective
