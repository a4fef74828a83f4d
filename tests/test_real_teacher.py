"""The embedded SmolLM2-135M-Instruct teacher (Llama architecture, GQA 9/3 heads, 30 layers)."""

import copy

import pytest
import torch

from conftest import relative_error
from linearize import ConversionSpec, attention_mode, convert_model


def random_tokens(batch, length, vocab, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def smol(teacher):  # noqa: keeps all threads (see conftest)
    model, tokenizer, source = teacher
    return copy.deepcopy(model), tokenizer


def test_lolcats_with_window_over_whole_sequence_gives_teacher_logits(smol):
    model, _ = smol
    x = random_tokens(1, 256, model.config.vocab_size)
    with torch.no_grad():
        expected = model(x).logits
        convert_model(model, ConversionSpec("lolcats", settings={"window_size": 256}))
        got = model(x).logits
    assert (got - expected).abs().max() <= 1e-4


def test_converted_teacher_parallel_equals_recurrent(smol):
    model, _ = smol
    convert_model(model, ConversionSpec("lolcats", layers=[0, 1, 29], settings={"window_size": 64}))
    x = random_tokens(1, 100, model.config.vocab_size, seed=1)
    with torch.no_grad():
        parallel = model(x, use_cache=False).logits
        with attention_mode(model, "student", form="recurrent"):
            recurrent = model(x, use_cache=False).logits
    assert relative_error(recurrent, parallel) <= 1e-5


def test_converted_teacher_generates_from_its_cache_what_the_parallel_form_gives(smol):
    model, tokenizer = smol
    convert_model(model, ConversionSpec("hedgehog", layers={"every": 3}))
    prompt = tokenizer("The lighthouse keeper read", return_tensors="pt")
    with_cache = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    without = model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert with_cache.tolist() == without.tolist()
