"""Running a tensor-parallel model: process groups, rank 0's decoder, the other ranks' loop, launching.

One process per rank. Rank 0 is the ordinary program (tokenizer, sampling, the engine's batching loop,
the terminal or the server); its decoder is ``ParallelDecoder``, a ``TorchDecoder`` whose every model
call is first broadcast to the other ranks as a small integer message (token ids, positions, the
sequences' KV-cache block tables). The other ranks run ``worker_loop``: receive a call, run the same
forward on their shard (its all-reduces meet rank 0's), repeat. Each rank keeps its own KV cache (its KV
heads) laid out by rank 0's block tables, so rank 0's paged-cache bookkeeping is the only one.

Two process groups: the model's collectives run on the default group (NCCL on CUDA, gloo on CPU) with a
``timeout`` (a hung rank becomes an error naming the timeout, not a hang); the messages from rank 0 go
over a gloo group that waits as long as rank 0 does (a chat user may think for an hour). A rank that
fails writes its error to the rendezvous store and exits; a rank whose collective then fails reads it
and raises ``ParallelError`` naming the rank and its error. Ranks other than 0 ignore Ctrl-C (rank 0
decides: a reply is stopped, or every rank is told to stop) and die on SIGTERM.

Launch with torchrun (``torchrun --nproc-per-node 2 -m llama3 generate ...``, multi-node with its usual
``--nnodes/--node-rank/--rdzv-endpoint``) or ``llama3 ... --tp 2``, which starts ranks 1.. itself and
runs rank 0 in the calling process (so it keeps the terminal).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..engine.cache import PagedKVCache, PagedView
from ..engine.decoders import TorchDecoder

DEFAULT_TIMEOUT = 300.0  # seconds a model collective may wait for the slowest rank
_IDLE = timedelta(days=30)  # how long ranks > 0 wait for rank 0's next message
_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Messages from rank 0: a header of 10 int64 (op, then op-specific fields), then a payload for FORWARD.
INIT, FORWARD, STOP, ABORT = 1, 2, 3, 4
_HEADER = 10  # the payload length goes last


class ParallelError(RuntimeError):
    """A rank failed or stopped answering; the message names which and why."""


@dataclass
class Session:
    """This process's place in a tensor-parallel run: its rank, the process groups, the store."""

    rank: int
    world: int
    device: torch.device
    store: dist.Store
    group: dist.ProcessGroup
    control: dist.ProcessGroup
    timeout: float
    workers: list[subprocess.Popen] = field(default_factory=list)  # ranks this process started (--tp)
    _caches: int = 0

    @property
    def backend(self) -> str:
        return dist.get_backend(self.group)

    # ------------------------------------------------------------------ rank 0 -> the others
    def send(self, op: int, *fields: int, payload: torch.Tensor | None = None) -> None:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0] = op
        header[1:1 + len(fields)] = torch.tensor(fields, dtype=torch.int64)
        if payload is not None:
            header[-1] = payload.numel()
        self._broadcast(header)
        if payload is not None:
            self._broadcast(payload.to(torch.int64).reshape(-1).cpu())

    def receive(self) -> tuple[list[int], torch.Tensor | None]:
        header = torch.empty(_HEADER, dtype=torch.int64)
        self._broadcast(header)
        fields = header.tolist()
        payload = None
        if fields[0] == FORWARD:
            payload = torch.empty(fields[-1], dtype=torch.int64)
            self._broadcast(payload)
        return fields, payload

    def _broadcast(self, t: torch.Tensor) -> None:
        try:
            dist.broadcast(t, src=0, group=self.control)
        except RuntimeError as e:
            raise self.failure(e) from None

    def next_cache_id(self) -> int:
        self._caches += 1
        return self._caches

    # ------------------------------------------------------------------------------ failures
    def report(self, message: str) -> None:
        """Leave this rank's error where the others look for it (best effort: rank 0 may be gone)."""
        with contextlib.suppress(Exception):
            self.store.set(f"error/{self.rank}", message)

    def failure(self, error: BaseException) -> ParallelError:
        """A collective failed: a ParallelError naming the rank that reported an error, if one did."""
        reasons = []
        deadline = time.monotonic() + 1.0  # the failed rank writes its error before it exits
        while not reasons and time.monotonic() < deadline:
            for r in range(self.world):
                with contextlib.suppress(Exception):
                    if r != self.rank and self.store.check([f"error/{r}"]):
                        reasons.append(f"rank {r} failed: {self.store.get(f'error/{r}').decode()}")
            if not reasons:
                time.sleep(0.05)
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not reasons and ("timed out" in text.lower() or "timeout" in text.lower()):
            reasons.append(f"a collective waited more than {self.timeout:.0f} s: another rank hangs or died")
        elif not reasons:
            reasons.append("another rank stopped answering (it exited or was killed)")
        return ParallelError(f"rank {self.rank}: {'; '.join(reasons)} [{text}]")

    def close(self, ok: bool) -> int:
        """Tell the other ranks to stop (rank 0), wait for the ranks this process started, leave the groups.
        Returns the exit status the run should have (non-zero if a rank failed)."""
        status = 0 if ok else 1
        if self.rank == 0:
            with contextlib.suppress(Exception):
                self.send(STOP if ok else ABORT)
        for p in self.workers:
            try:
                code = p.wait(timeout=min(self.timeout, 30.0))
            except subprocess.TimeoutExpired:
                p.terminate()
                code = p.wait()
            if code != 0:
                status = status or 1
        if ok:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        return status


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) set by torchrun or ``--tp``; (0, 1, 0) when neither launched us."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world, int(os.environ.get("LOCAL_RANK", str(rank)))


def init(timeout: float = DEFAULT_TIMEOUT, device: str | None = None) -> Session:
    """Join the run described by the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as torchrun
    sets them): NCCL on CUDA (one GPU per local rank), gloo on CPU."""
    rank, world, local = world_from_env()
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        local_world, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), torch.cuda.device_count()
        if local_world > gpus:  # NCCL runs one rank per GPU
            raise ParallelError(f"rank {rank}: {local_world} ranks on this machine need {local_world} GPUs; "
                                f"{gpus} visible (use fewer ranks, or --device cpu)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    # torchrun's agent hosts the store itself; otherwise rank 0 does.
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    wait = timedelta(seconds=timeout)
    try:
        base = dist.TCPStore(addr, port, world, is_master=rank == 0 and not agent, timeout=wait)
    except Exception as e:  # noqa: BLE001 - torch raises DistNetworkError/RuntimeError/TimeoutError here
        raise ParallelError(f"rank {rank}: cannot reach the rendezvous at {addr}:{port}: {e}") from None
    store = dist.PrefixStore("llama3", base)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=wait)
    control = dist.new_group(backend="gloo", timeout=_IDLE)
    return Session(rank, world, dev, store, dist.group.WORLD, control, timeout)


# ----------------------------------------------------------------------------------------- rank 0
class ParallelDecoder(TorchDecoder):
    """``TorchDecoder`` on rank 0 of a tensor-parallel run: each model call is sent to the other ranks first."""

    name = "torch"

    def __init__(self, model, cache: PagedKVCache, session: Session):
        super().__init__(model, cache)
        self.session, self.cache_id = session, session.next_cache_id()
        dtype = _DTYPES.index(cache.dtype)
        session.send(INIT, self.cache_id, cache.n_blocks, cache.block_size, dtype)
        self.model = _Broadcasting(model, session, self.cache_id)

    def describe(self) -> str:
        return f"Transformer.forward over {self.session.world} ranks ({self.session.backend}, tensor parallel)" + \
            (", batch-invariant" if self.batch_invariant else "")


class _Broadcasting:
    """The model, called as ``TorchDecoder`` calls it, after sending the call to the other ranks."""

    def __init__(self, model, session: Session, cache_id: int):
        self.model, self.session, self.cache_id = model, session, cache_id

    def __call__(self, tokens: torch.Tensor, start_pos=0, cache: PagedView | None = None, last_only: bool = False):
        batch, seq = tokens.shape
        tables = cache.tables.cpu()
        per_row = isinstance(start_pos, torch.Tensor)
        starts = start_pos.reshape(-1).cpu() if per_row else torch.empty(0, dtype=torch.int64)
        payload = torch.cat([tokens.reshape(-1).cpu(), starts, tables.reshape(-1)])
        # Ctrl-C waits for the call to end: a message or a forward half done on rank 0 would leave the others
        # waiting for the rest of it.
        with _sigint_deferred():
            self.session.send(FORWARD, self.cache_id, batch, seq, tables.shape[1], int(per_row),
                              0 if per_row else int(start_pos), int(last_only), payload=payload)
            try:
                return self.model(tokens, start_pos=start_pos, cache=cache, last_only=last_only)
            except RuntimeError as e:
                if isinstance(e, ParallelError) or not _is_collective_error(e):
                    raise
                raise self.session.failure(e) from None


def _is_collective_error(e: RuntimeError) -> bool:
    text = str(e).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket"))


@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C until the block ends (then raise it), in the main thread; elsewhere do nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit = []
    previous = signal.signal(signal.SIGINT, lambda *_: hit.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if hit:
            raise KeyboardInterrupt


# ------------------------------------------------------------------------------------- ranks > 0
class _TableView(PagedView):
    """The cache as a forward sees it, laid out by block tables rank 0 sent (rank 0 owns the bookkeeping)."""

    def __init__(self, cache: PagedKVCache, tables: torch.Tensor):
        self.cache, self.tables = cache, tables.to(cache.device)


@torch.inference_mode()
def worker_loop(model, session: Session) -> int:
    """Replay rank 0's model calls on this rank's shard until told to stop; 0 on STOP, 1 on ABORT."""
    caches: dict[int, PagedKVCache] = {}
    kv_heads = model.layers[0].attention.n_kv_heads
    while True:
        fields, payload = session.receive()
        op = fields[0]
        if op == STOP:
            return 0
        if op == ABORT:
            return 1
        if op == INIT:
            cid, n_blocks, block, dtype = fields[1:5]
            caches[cid] = PagedKVCache(model.args, n_blocks * block, block_size=block, dtype=_DTYPES[dtype],
                                       device=session.device, kv_heads=kv_heads, prefix_caching=False)
        elif op == FORWARD:
            cid, batch, seq, width, per_row, start, last_only = fields[1:8]
            tokens, rest = payload[:batch * seq].view(batch, seq), payload[batch * seq:]
            if per_row:
                start, rest = rest[:batch].to(session.device), rest[batch:]
            view = _TableView(caches[cid], rest.view(batch, width))
            try:
                model(tokens.to(session.device), start_pos=start, cache=view, last_only=bool(last_only))
            except RuntimeError as e:
                if not _is_collective_error(e):
                    raise
                raise session.failure(e) from None
        else:
            raise ParallelError(f"rank {session.rank}: unknown message {op} from rank 0")


# ---------------------------------------------------------------------------------------- launching
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # in the child, before exec: SIGTERM when the launching process dies
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn_ranks(world: int, argv: list[str]) -> list[subprocess.Popen]:
    """Start ranks 1..world-1 as ``python -m llama3 argv`` and make this process rank 0 (environment
    variables as torchrun sets them, on this machine)."""
    port = free_port()
    common = {"WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(port)}
    procs = []
    for r in range(1, world):
        env = dict(os.environ, **common, RANK=str(r), LOCAL_RANK=str(r))
        procs.append(subprocess.Popen([sys.executable, "-m", "llama3", *argv], env=env, stdin=subprocess.DEVNULL,
                                      preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None))
    os.environ.update(common, RANK="0", LOCAL_RANK="0")
    return procs


def worker_signals() -> None:
    """Ranks > 0: Ctrl-C is rank 0's to handle (it reaches every process of the terminal's group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def rank0_signals() -> None:
    """Rank 0: SIGTERM unwinds like Ctrl-C, so the other ranks are told to stop."""
    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)


# ------------------------------------------------------------------------------ in-process (tests, bench)
def run_ranks(fn, world: int, *args, timeout: float = 120.0, collective_timeout: float = 30.0,
              threads: int | None = None, device: str = "cpu") -> list:
    """``fn(session, *args)`` on ``world`` fresh processes (a free local port, gloo on CPU); returns each
    rank's result, in rank order. Every rank must finish within ``timeout`` seconds (else all are killed
    and TimeoutError says which hung); if any raised, ParallelError carries every rank's error."""
    import multiprocessing
    import tempfile

    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="llama3-ranks-") as out:
        procs = [ctx.Process(target=_rank_main, daemon=True,
                             args=(r, world, port, collective_timeout, threads, device, fn, args, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        # Each rank leaves its result (or its error) in a file: a pipe would block a rank with a large result
        # until read, and a rank killed mid-write would leave half a message.
        results, errors = [None] * world, {}
        for r in range(world):
            if os.path.exists(f"{out}/{r}.pt"):
                results[r] = torch.load(f"{out}/{r}.pt", weights_only=False)  # our own child's file
            elif os.path.exists(f"{out}/{r}.err"):
                with open(f"{out}/{r}.err") as f:
                    errors[r] = f.read()
            elif r not in hung:
                errors[r] = f"exited with status {procs[r].exitcode} and no result"
    if hung:
        raise TimeoutError(f"rank(s) {hung} still running after {timeout:.0f} s; errors so far: {errors}")
    if errors:
        raise ParallelError("; ".join(f"rank {r}: {m}" for r, m in sorted(errors.items())))
    return results


def _rank_main(rank, world, port, collective_timeout, threads, device, fn, args, out) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(threads)
    session = None
    try:
        session = init(collective_timeout, device)
        torch.save(fn(session, *args), f"{out}/{rank}.tmp")
        os.replace(f"{out}/{rank}.tmp", f"{out}/{rank}.pt")
        session.close(True)
    except BaseException as e:  # noqa: BLE001 - every failure is reported to the caller, then the rank exits
        if session is not None and isinstance(e, RuntimeError) and _is_collective_error(e):
            e = session.failure(e)  # which rank broke the collective, and why
        message = f"{type(e).__name__}: {e}"
        if session is not None:
            session.report(message)
        with open(f"{out}/{rank}.err", "w") as f:
            f.write(message)
        sys.stderr.flush()
        os._exit(1)  # not a clean teardown: the groups may be mid-collective
