"""ctypes mirrors of the C structs that kernels/decode.c and kernels/attention.c read, and the check that
the C compiler laid them out the same way (``decode_struct_layout``), run before the one-call step is used."""

from __future__ import annotations

import ctypes

import torch

KINDS = {"q8": 0, "q4_0": 1, "q4_1": 2}  # the C side's enum of block kinds (kernels/qgemv.h)
F32 = 3
KV_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # kernels/attention.h's enum
_p, _i64, _f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double


class MatDesc(ctypes.Structure):  # qmat
    _fields_ = [("kind", _i64), ("qs", _p), ("d", _p), ("m", _p), ("rows", _i64), ("k", _i64)]


class LayerDesc(ctypes.Structure):  # layer_w
    _fields_ = [("attn_norm", _p), ("ffn_norm", _p), ("qkv", MatDesc * 3), ("n_qkv", _i64),
                ("w13", MatDesc * 2), ("n_w13", _i64), ("wo", MatDesc), ("w2", MatDesc)]


class ModelDesc(ctypes.Structure):  # model_w
    _fields_ = [("dim", _i64), ("n_layers", _i64), ("n_heads", _i64), ("n_kv_heads", _i64), ("head_dim", _i64),
                ("hidden", _i64), ("vocab", _i64), ("eps", _f64), ("attn_scale", _f64), ("rope_freqs", _p),
                ("embed", MatDesc), ("norm", _p), ("output", MatDesc), ("layers", ctypes.POINTER(LayerDesc))]


class CacheDesc(ctypes.Structure):  # kv_cache
    _fields_ = [("pool", _p), ("dtype", _i64), ("block_size", _i64), ("n_layers", _i64)]


def layout_mismatch(lib) -> str | None:
    """None when ctypes lays the structs out as the C compiler did, else what differs."""
    ours = []
    for struct in (MatDesc, LayerDesc, ModelDesc, CacheDesc):
        ours += [ctypes.sizeof(struct)] + [getattr(struct, name).offset for name, _ in struct._fields_]
    ours += [KV_DTYPES[t] for t in (torch.float32, torch.float16, torch.bfloat16)]
    out = (ctypes.c_int64 * 64)()
    theirs = list(out[:lib.decode_struct_layout(out, 64)])
    return None if theirs == ours else f"the C structs' layout {theirs} differs from ctypes' {ours}"
