"""How a loaded model runs: ``load(threads=, kv_dtype=)`` and the CLI's ``--threads``/``--kv-dtype``/``--quantize``
reach the engine (its decoder, its cache) and the server's scheduler, and bad values are refused."""

import subprocess
import sys

import pytest
import torch

import llama3
from llama3.quantize import SCHEMES


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_and_kv_dtype_reach_the_engine(restore_threads):
    llm = llama3.load(quiet=True, device="cpu", threads=1, kv_dtype="bfloat16")
    engine = llm.generator.engine
    assert torch.get_num_threads() == 1
    assert engine.decoder.threads == 1  # the C step's upper bound: it never tries 2
    assert engine.cache.dtype == torch.bfloat16
    assert llm.engine_options == {"threads": 1, "kv_dtype": torch.bfloat16}
    out = llm.generate("The capital of France is", max_new_tokens=4, temperature=0)
    assert out.completion_tokens == 4


def test_kv_dtype_changes_only_rounding(smollm2_fast, restore_threads):
    """A float32 cache against the default float16 one: the first greedy tokens agree (the logits differ
    by the float16 rounding of keys and values, far below the gaps between the top tokens here)."""
    wide = llama3.load(quiet=True, device="cpu", kv_dtype="float32")
    assert wide.generator.engine.cache.dtype == torch.float32
    assert smollm2_fast.generator.engine.cache.dtype == torch.float16
    prompt = "The capital of France is"
    assert wide.generate(prompt, max_new_tokens=6, temperature=0).token_ids == \
        smollm2_fast.generate(prompt, max_new_tokens=6, temperature=0).token_ids


def test_scheduler_takes_the_models_engine_options(restore_threads):
    from llama3.server.scheduler import Scheduler

    llm = llama3.load(quiet=True, device="cpu", threads=1, kv_dtype="float32")
    scheduler = Scheduler(llm, max_batch=2)
    try:
        assert scheduler.engine.cache.dtype == torch.float32 and scheduler.engine.decoder.threads == 1
    finally:
        scheduler.stop()


@pytest.mark.parametrize("kwargs, message", [({"threads": 0}, "threads must be a positive integer"),
                                             ({"threads": "2"}, "threads must be a positive integer"),
                                             ({"kv_dtype": "int3"}, "unknown kv_dtype 'int3'"),
                                             ({"quantize": "q9_k"}, "unknown quantize 'q9_k'")])
def test_bad_options_are_refused_before_reading(kwargs, message):
    with pytest.raises(ValueError, match=message):
        llama3.load(quiet=True, device="cpu", **kwargs)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llama3.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_threads_kv_dtype_and_quantize_schemes():
    help_text = run_cli("generate", "--help").stdout
    for flag in ("--threads", "--kv-dtype", "--quantize"):
        assert flag in help_text
    assert "q4_k" in help_text and "q8_0" in help_text
    base = run_cli("generate", "-t", "0", "-n", "5", "The capital of France is")
    assert base.returncode == 0, base.stderr
    one = run_cli("generate", "-t", "0", "-n", "5", "--threads", "1", "--kv-dtype", "float32",
                  "The capital of France is")
    assert one.returncode == 0, one.stderr
    assert one.stdout == base.stdout  # threads never change the numbers; the cache dtype not these tokens
    bad = run_cli("generate", "--quantize", "q9_k", "x")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    assert set(SCHEMES) >= {"int8", "int4", "q8_0", "q4_k", "q6_k", "q4_0"}


@pytest.mark.parametrize("flags, expected", [({"avx2", "avx512_bf16"}, "bfloat16"), ({"amx_bf16", "avx2"}, "bfloat16"),
                                             ({"avx2", "fma"}, "float32")])
def test_prefill_dtype_follows_the_cpus_bf16_hardware(monkeypatch, flags, expected):
    from llama3 import kernels
    from llama3.engine import choose_prefill_dtype

    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    assert choose_prefill_dtype(torch.device("cpu")).name == expected
    assert choose_prefill_dtype(torch.device("meta")).name == "float32"  # not a CPU: no CPU feature applies


def test_bf16_prefill_matches_float32_prefill():
    """Both prefill policies on the same blocks, on a prompt longer than the kernels' share of prefill
    under bfloat16 (128 rows), so bfloat16 GEMMs run: bfloat16 rounds activations and dequantized weights
    to 8 mantissa bits; measured mean KL 0.0006 nats, top-1 100% on a shorter prompt. The bound (mean KL
    < 0.01 nats, top-1 > 90%) is far below what a wrong layout gives (> 1)."""
    from llama3.engine.policy import KERNEL_ROWS_WITH_BF16
    from llama3.quantize import PREFILL_ANY_ROWS, QuantLinear

    fast = llama3.load(quiet=True, device="cpu", prefill_dtype="float32")
    bf16 = llama3.load(quiet=True, device="cpu", prefill_dtype="bfloat16")
    layers = [m for m in bf16.model.modules() if isinstance(m, QuantLinear)]
    assert all(m.prefill_dtype == torch.bfloat16 and m.kernel_rows == KERNEL_ROWS_WITH_BF16 for m in layers)
    assert all(m.kernel_rows == PREFILL_ANY_ROWS for m in fast.model.modules() if isinstance(m, QuantLinear))
    assert "up to 128 rows, then bfloat16 GEMMs" in bf16.describe()
    assert "prefill: the block kernels at any length" in fast.describe()
    text = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
            "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
            "quickly and cheaply. ") * 5
    tokens = torch.tensor([fast.tokenizer.encode(text, bos=False)])
    assert tokens.shape[1] > KERNEL_ROWS_WITH_BF16
    with torch.no_grad():
        a = fast.model(tokens).float().log_softmax(-1)[0]
        b = bf16.model(tokens).float().log_softmax(-1)[0]
    kl = (a.exp() * (a - b)).sum(-1).mean().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert kl < 0.01 and top1 > 0.9, (kl, top1)
