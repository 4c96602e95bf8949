"""The fuzzing harnesses (fuzz/) in CI: each on its committed corpus, then on a few seconds of
mutations of it (deterministic: a fixed count, seeded per harness), each input within a time and a
memory bound.

A harness fails on anything but success or our typed errors. ``make fuzz`` runs the same harnesses
coverage-guided under atheris for as long as asked; the inputs it finds go to fuzz/crashes/ (bugs
reported in another module, ``harnesses.KNOWN_FINDINGS``, which must still fail there) or, once
fixed, to the corpus.
"""

from __future__ import annotations

import importlib.util
import os
import random
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
sys.path.insert(0, str(FUZZ))

import harnesses  # noqa: E402

HARNESSES = harnesses.harnesses()
INPUT_SECONDS = 10  # one input, however hostile (the slowest legitimate one takes ~0.4 s: loading a tokenizer)
RSS_GROWTH_MB = 1024  # what all inputs of one harness together may add to the process's peak memory
INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff", b"\x00\x00\x00\x80",
               b"\xff\xff\xff\xff\xff\xff\xff\x7f", b"\x00\x00\x00\x00\x00\x00\x00\x80", b"-1", b"1e308", b"99999999999",
               b"{", b"[", b'"', b"\\u", b"{{", b"{%", b"%}", b"}}", b" ", b"\n"]


def mutate(data: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    """libFuzzer's simplest mutations, a few at a time: flip, overwrite, insert, erase, copy, splice."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(out) + 1)
        op = rng.randrange(6)
        if op == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            value = rng.choice(INTERESTING)
            out[at:at + len(value)] = value
        elif op == 2:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3:
            del out[at:at + rng.randint(1, 64)]
        elif op == 4 and out:
            start = rng.randrange(len(out))
            out[at:at] = out[start:start + rng.randint(1, 32)]
        elif op == 5:
            other = rng.choice(corpus)
            cut = rng.randrange(len(other) + 1)
            out[at:] = other[cut:]
    return bytes(out)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def time_limit(seconds: int, what: str):
    def expired(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run(harness, data: bytes, rss_start: float, known: list[str]) -> None:
    with time_limit(INPUT_SECONDS, f"{harness.name} on an input of {len(data)} bytes"):
        try:
            harnesses.check(harness, data)
        except harnesses.KnownFinding as e:
            known.append(str(e))
    grown = peak_rss_mb() - rss_start
    assert grown < RSS_GROWTH_MB, f"{harness.name}: peak memory grew by {grown:.0f} MB (input {data[:80]!r})"


@pytest.mark.parametrize("name", sorted(HARNESSES))
def test_harness_on_corpus_and_mutations(name):
    harness = HARNESSES[name]
    corpus = [p.read_bytes() for p in sorted((FUZZ / "corpus" / name).iterdir())]
    assert corpus, f"fuzz/corpus/{name} is empty: run fuzz/seeds.py"
    harnesses.check(harness, b"")  # loads what the harness keeps loaded (a reference tokenizer)
    rss_start, known = peak_rss_mb(), []
    for data in corpus:
        run(harness, data, rss_start, known)
    assert not known, f"a corpus input hits a known finding: {known[0]}"
    rng = random.Random(name)
    start = time.monotonic()
    for _ in range(harness.smoke_runs):
        run(harness, mutate(rng.choice(corpus), rng, corpus), rss_start, known)
    print(f"{name}: {len(corpus)} corpus inputs, {harness.smoke_runs} mutations in {time.monotonic() - start:.1f} s, "
          f"{len(known)} hit known findings")


def test_known_findings_still_fail():
    """Every saved crash input still fails as its known finding says (a hang: still runs past 2 s): once
    one is fixed, its entry leaves KNOWN_FINDINGS and its inputs move to the corpus, where they guard
    against the bug coming back."""
    crashes = sorted(p for p in (FUZZ / "crashes").glob("*/*") if p.is_file())
    for known in harnesses.KNOWN_FINDINGS:
        inputs = [p for p in crashes if p.parent.name == known.harness and p.name.startswith(known.finding)]
        assert inputs, f"the known finding {known.finding} has no input in fuzz/crashes/{known.harness}/"
        for path in inputs:
            crashes.remove(path)
            if known.error == "timeout":
                with pytest.raises(harnesses.Finding) as e, time_limit(2, known.finding):
                    harnesses.check(HARNESSES[known.harness], path.read_bytes())
                assert isinstance(e.value.__cause__, TimeoutError)
            else:
                with pytest.raises(harnesses.KnownFinding, match=known.finding):
                    harnesses.check(HARNESSES[known.harness], path.read_bytes())
    assert not crashes, f"inputs in fuzz/crashes/ that no known finding explains: {crashes}"


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris runs on Linux/macOS x86-64 wheels")
def test_atheris_runner(tmp_path):
    """fuzz/run.py drives a harness under atheris (the coverage-guided runs of `make fuzz`)."""
    env = dict(os.environ, HOME=str(tmp_path),  # what the fuzzer learns goes under ~/.cache
               PYTHONPATH=os.pathsep.join([str(FUZZ.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(FUZZ / "run.py"), "gguf_vocab", "-runs=300", "-seed=1"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Done 300 runs" in done.stderr and "cov:" in done.stderr
