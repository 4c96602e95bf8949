"""`python -m llama3.kernels` builds the C kernels for every ISA this CPU runs (the Makefile runs it at set-up)
and says which one is used."""

from . import available_isas, isa, runnable_isas, why_not

for name in runnable_isas():
    print(f"{name}: {'built' if name in available_isas() else f'unavailable ({why_not(name)})'}")
print(f"in use: {isa()}" if isa() else f"kernels unavailable ({why_not()}); the PyTorch fallback will be used")
