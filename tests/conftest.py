import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernel tests (tests/kernels/test_triton_linear.py) run in Triton's CPU
# interpreter. Triton decides that when it is first imported, and importing the project already
# imports it (through torch._dynamo), so the switch is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(family: str, **overrides):
    """A tiny randomly initialised model config of ``family``, with GQA (4 query heads, 2 kv heads)."""
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if family == "qwen2":
        kwargs["attention_bias"] = True  # Qwen2 projections carry biases
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    with torch.no_grad():  # larger random q/k so attention is far from uniform
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return model.eval()


@pytest.fixture(scope="session")
def teacher():
    """The embedded SmolLM2-135M-Instruct teacher (converted from GGUF once, then cached)."""
    from linearize.models import load_teacher

    model, tokenizer, source = load_teacher("smollm2-135m-instruct")
    return model, tokenizer, source


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run fastest on one thread (no synchronisation); the real teacher gets them all."""
    saved = torch.get_num_threads()
    torch.set_num_threads(saved if "teacher" in request.fixturenames else 1)
    yield
    torch.set_num_threads(saved)


def converted_model(family: str, spec, seed: int = 0, train_like: bool = True, **overrides):
    """A tiny model of ``family`` converted by ``spec``; with ``train_like`` its student weights are
    moved off their initialisation so tests cover trained-looking students too. ``overrides`` go
    to :func:`tiny_config` (e.g. ``num_hidden_layers=1``)."""
    from linearize import convert_model, students

    model = tiny_model(family, seed=seed, **overrides)
    convert_model(model, spec)
    if train_like:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for s in students(model).values():
                for _, p in s.student_parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def token_ids(batch: int, length: int, seed: int = 0, vocab: int = 97) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits_by_form(model, x, forms=("chunk", "recurrent", "naive")) -> dict:
    """The model's logits on ``x`` (no cache) with every student computing in each form."""
    from linearize import attention_mode

    out = {}
    with torch.no_grad():
        for form in forms:
            with attention_mode(model, "student", form=form):
                out[form] = model(x, use_cache=False).logits
    return out


# generate() settings that every student's cache must serve: greedy, sampling, beams (the cache
# reordered) and several returns (the cache expanded).
generate_options = pytest.mark.parametrize(
    "options",
    [dict(do_sample=False), dict(do_sample=True, top_k=20), dict(num_beams=3, do_sample=False), dict(num_beams=2, num_return_sequences=2)],
    ids=["greedy", "sampling", "beam", "beam-return-2"],
)


def greedy_by_rerun(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation by re-running the parallel form on the whole sequence for every token."""
    seq = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq


def generate_with_and_without_cache(model, prompt: torch.Tensor, new_tokens: int, options: dict) -> list[list]:
    """``generate()`` with the students' cache and without any, from the same seed."""
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        outs.append(model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                   use_cache=use_cache, **options).tolist())
    return outs


# The tiny tokenizer's words: WORDS[i] is token i; WORDS[0] is unknown/padding, WORDS[1] ends a text.
WORDS = ["w" + chr(97 + i // 26) + chr(97 + i % 26) for i in range(97)]

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} " + WORDS[1] + " {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def make_base_folder(folder, family: str = "llama", seed: int = 0):
    """A tiny model of ``family`` saved as a Hugging Face folder, with a word-level tokenizer
    over :data:`WORDS` and a chat template. (Only families whose tokenizer transformers loads
    from ``tokenizer.json`` as it is, such as llama, tokenize these words exactly; qwen2 swaps
    in its own tokenizer class.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_model(family, seed=seed).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token=WORDS[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=WORDS[0], pad_token=WORDS[0], eos_token=WORDS[1])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


@pytest.fixture
def base_folder(tmp_path):
    return make_base_folder(tmp_path / "base")


def tiny_transfer_recipe(kind: str, train: str) -> str:
    """A recipe YAML for the tiny model: 4 attention-transfer steps of 2 x 32 tokens on the text
    file ``train`` (held-out text: the same file); LoLCATs with a 4-token window and 1 sink, other
    kinds at their defaults."""
    window = ", window_size: 4, sink_size: 1" if kind == "lolcats" else ""
    return f"""
students: {{kind: {kind}{window}}}
stages:
  - stage: attention_transfer
    data: {{source: text, path: {train}}}
    seq_len: 32
    batch_size: 2
    steps: 4
    lr: 1.0e-2
    val_blocks: 2
    eval_every: 10
    checkpoint_every: 10
eval:
  data: {{source: text, path: {train}}}
  seq_len: 32
  max_blocks: 2
"""


def synthetic_text(words: int, seed: int = 0) -> str:
    """Text over the tiny tokenizer's words with a little structure (repeated phrases), so a
    model can learn something from it."""
    rng = torch.Generator().manual_seed(seed)
    phrases = [" ".join(WORDS[int(i)] for i in torch.randint(2, 97, (6,), generator=rng)) for _ in range(12)]
    picks = torch.randint(0, len(phrases), (words // 6 + 1,), generator=rng)
    return " ".join(phrases[int(i)] for i in picks)
