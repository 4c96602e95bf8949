import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))
# transformers imports torchao (a test extra) when it builds a model; torchao's CUDA-only extensions then log
# that they cannot load on this CPU build of torch: noise, not a failure
logging.getLogger("torchao").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def smollm2():
    """Our Llama on the embedded SmolLM2-135M-Instruct GGUF: the exact float32 path (dequantized)."""
    import llama3

    return llama3.load(quiet=True, device="cpu", dtype="float32", quantize=None)


@pytest.fixture(scope="session")
def smollm2_fast():
    """The same model on the default fast path: GGUF blocks kept quantized, fused projections."""
    import llama3

    return llama3.load(quiet=True, device="cpu")


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own loading of the same GGUF file (it dequantizes to float32): (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from helpers import smollm2_path

    logging.disable_progress_bar()
    path = smollm2_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer
