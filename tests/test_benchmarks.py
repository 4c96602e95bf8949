"""The benchmark scripts run (speed itself is never asserted: see README, Speed)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_decode_script_smoke_run_on_cpu():
    """benchmarks/gpu_decode.py is meant for a CUDA device; its CPU smoke mode checks the plumbing."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_decode.py"), "--device", "cpu",
                          "--preset", "tiny", "--dtype", "float32", "--copy-mb", "16", "--context", "16",
                          "--steps", "4", "--batches", "1,4", "--prefill", "16,64"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "measured copy bandwidth" in out.stdout and "of the measured bandwidth" in out.stdout
    for line in ("prefill 16 tokens", "prefill 64 tokens", "float32 batch 4:", "compile: batch 4 x 16 blocks",
                 "engine, 4 concurrent requests"):
        assert line in out.stdout, out.stdout
