"""`python -m llama3.kernels` builds the C kernels (the Makefile runs it at set-up)."""

from . import _why_not, build

path = build(verbose=True)
print(path if path else f"kernels unavailable ({_why_not}); the PyTorch fallback will be used")
