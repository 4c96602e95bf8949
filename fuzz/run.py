"""Run one fuzzing harness under atheris (coverage-guided libFuzzer for Python).

    python fuzz/run.py NAME [--skip-known] [libFuzzer flags...]   e.g.  python fuzz/run.py chat_template -max_total_time=600

Seeds come from ``fuzz/corpus/NAME`` (committed); what the fuzzer learns goes to
``~/.cache/llama3/fuzz/NAME`` (kept between runs); a failing input is written to
``fuzz/crashes/NAME/`` and stops the run. Each input gets ``-timeout`` seconds (default 20) and the
process ``-rss_limit_mb`` of memory (default 3072): exceeding either is a finding too.
With ``--skip-known``, inputs that hit an already reported finding (``harnesses.KNOWN_FINDINGS``)
are counted and passed over, so a long campaign goes on looking for new ones.
A ``-max_total_time`` longer than ``CHUNK_SECONDS`` runs as several fresh processes one after the
other, each of at most ``CHUNK_RUNS`` inputs (the learned corpus carries over): ``tokenizers`` leaks
about 5 KB per tokenizer it builds, which over half a million inputs reaches the memory limit and
would read as a finding.
``make fuzz FUZZ_SECONDS=600`` runs every harness in turn.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
sys.path.insert(0, str(FUZZ))
CHUNK_SECONDS, CHUNK_RUNS = 300, 200_000


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1].startswith("-"):
        sys.exit(__doc__)
    total = next((int(f.split("=", 1)[1]) for f in argv if f.startswith("-max_total_time=")), 0)
    if total > CHUNK_SECONDS:
        return in_chunks(argv, total)
    fuzz(argv)
    return 0


def in_chunks(argv: list[str], total: int) -> int:
    import subprocess
    import time

    rest = [a for a in argv[1:] if not a.startswith("-max_total_time=")]
    if not any(a.startswith("-runs=") for a in rest):
        rest.append(f"-runs={CHUNK_RUNS}")
    while total > 0:
        start = time.monotonic()
        code = subprocess.run([sys.executable, __file__, *rest, f"-max_total_time={min(CHUNK_SECONDS, total)}"],
                              check=False).returncode
        if code:
            return code  # a finding: its input is in fuzz/crashes/
        total -= max(1, round(time.monotonic() - start))
    return 0


def fuzz(argv: list[str]) -> None:
    import atheris

    name, flags = argv[1], [f for f in argv[2:] if f != "--skip-known"]
    skip_known = "--skip-known" in argv
    # Coverage comes from the Python modules imported here: ours and the pure-Python libraries
    # whose branches the inputs drive (jinja2 for templates, pydantic for requests).
    with atheris.instrument_imports(include=["harnesses", "llama3", "jinja2", "gguf", "pydantic"]):
        import harnesses as h

        import llama3.chat
        import llama3.server.app
        import llama3.tokenizer
        import llama3.weights.gguf
        import llama3.weights.hf
        import llama3.weights.meta  # noqa: F401
    harness = h.harnesses().get(name)
    if harness is None:
        sys.exit(f"unknown harness {name!r}; one of: {', '.join(h.harnesses())}")
    h.check(harness, b"")  # warm up (a harness loads its reference tokenizer once) outside the timer
    learned = Path(os.path.expanduser("~/.cache/llama3/fuzz")) / name
    crashes = FUZZ / "crashes" / name
    learned.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    defaults = {"-timeout": "20", "-rss_limit_mb": "3072", "-max_len": str(harness.max_len),
                "-artifact_prefix": f"{crashes}/", "-print_final_stats": "1"}
    words = FUZZ / "dicts" / f"{name}.dict"  # the keys and keywords the inputs are made of
    if words.exists():
        defaults["-dict"] = str(words)
    given = {f.split("=", 1)[0] for f in flags}
    flags += [f"{k}={v}" for k, v in defaults.items() if k not in given]
    seen: set[str] = set()

    def test_one_input(data: bytes) -> None:
        try:
            h.check(harness, data)
        except h.KnownFinding as e:
            if not skip_known:
                raise
            if str(e.args[0]).rsplit("known: ", 1)[-1] not in seen:
                seen.add(str(e.args[0]).rsplit("known: ", 1)[-1])
                print(f"passing over {e}", file=sys.stderr)

    atheris.Setup([argv[0], *flags, str(learned), str(FUZZ / "corpus" / name)], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
