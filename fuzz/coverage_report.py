"""Line coverage of our modules reached by each harness's corpus (committed seeds plus what
``make fuzz`` learned in ``~/.cache/llama3/fuzz/NAME``), measured with coverage.py.

    python fuzz/coverage_report.py [NAME ...]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
sys.path.insert(0, str(FUZZ))

# The module each harness is about (its coverage is the figure to report).
TARGETS = {"gguf_header": ["weights/gguf.py", "tokenizer.py"], "hf_folder": ["weights/hf.py", "weights/common.py"],
           "meta_folder": ["weights/meta.py", "weights/common.py"], "tiktoken_model": ["tokenizer.py"],
           "tokenizer_json": ["tokenizer.py"], "gguf_vocab": ["tokenizer.py"], "chat_template": ["chat.py"],
           "server_requests": ["server/app.py"]}


def report(name: str) -> None:
    """One harness, in a fresh process (so that module-level lines count when they are imported)."""
    import coverage

    cov = coverage.Coverage(data_file=None, include=["*/llama3/*"])
    cov.start()
    import harnesses as h

    harness = h.harnesses()[name]
    inputs = [p for folder in (Path(os.path.expanduser("~/.cache/llama3/fuzz")) / name, FUZZ / "corpus" / name)
              if folder.is_dir() for p in folder.iterdir()]
    for path in inputs:
        try:
            h.check(harness, path.read_bytes())
        except h.Finding:
            pass
    cov.stop()
    for target in TARGETS[name]:
        file = next(f for f in cov.get_data().measured_files() if f.endswith("llama3/" + target))
        _, statements, _, missing, _ = cov.analysis2(file)
        print(f"{name:16s} {len(inputs):6d} inputs  {target:20s} {1 - len(missing) / len(statements):6.1%} of "
              f"{len(statements)} lines", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        report(sys.argv[2])
    else:
        import subprocess

        for name in sys.argv[1:] or list(TARGETS):
            subprocess.run([sys.executable, __file__, "--one", name], check=True)
