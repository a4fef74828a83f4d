"""Training and evaluation text: teacher-generated, local files, or Hub data sets, packed into
fixed-length token blocks.

Text the teacher writes itself needs no download: the teacher answers instruction prompts
(built in, or from a file) by sampling, and the texts are cached under the linearize cache
folder keyed by everything that determines them, so a second run reads them back at once.
The built-in prompts are split in two disjoint halves: ``split: train`` samples from one,
any other split (``test``, ``validation``) from the other, so held-out text never shares a
prompt with training text.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import cache_dir

BUILTIN_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works to a ten-year-old.",
    "Give three tips for learning a new language and explain each one.",
    "Describe the water cycle step by step.",
    "Write a letter to a friend describing your last holiday.",
    "What are the main causes of the seasons on Earth?",
    "Summarise the history of the printing press in a few paragraphs.",
    "Write a recipe for a simple vegetable soup, with the steps numbered.",
    "Explain the difference between a virus and a bacterium.",
    "Describe a busy market in a small town on a Saturday morning.",
    "How does a bicycle stay upright when it moves?",
    "Write a poem about the sea at night.",
    "Explain what a budget is and how to make a monthly one.",
    "Tell the story of a robot who learns to paint.",
    "What should someone pack for a week-long hiking trip? Explain why.",
    "Explain how a computer stores numbers in binary.",
    "Describe the life cycle of a butterfly.",
    "Write a dialogue between a teacher and a student about homework.",
    "Why do we have different time zones? Explain with an example.",
    "Give advice to someone starting their first job.",
    "Explain why the sky is blue.",
    "Write a short mystery story set in a library.",
    "Describe how to plant and care for a tomato plant.",
    "What are the benefits of regular exercise? Give examples.",
    "Explain how vaccines help the immune system.",
    "Write a product description for a new kind of umbrella.",
    "Describe the rules of chess for a beginner.",
    "Tell a fable about a fox and a crow, with a moral at the end.",
    "Explain the basics of how electricity reaches a house.",
    "Write a diary entry of a sailor in the eighteenth century.",
    "How do bees make honey? Explain the process.",
    "Compare living in a city with living in the countryside.",
    "Explain what gravity is and how it keeps the planets in orbit.",
    "Write instructions for making a paper aeroplane.",
    "Describe a thunderstorm from the point of view of a cat.",
    "What is the difference between weather and climate?",
    "Write a speech for the opening of a new school library.",
    "Explain how a recipe can be scaled up for more people.",
    "Tell the story of a village that runs out of water and how it is saved.",
    "Explain how maps represent the round Earth on flat paper.",
    "Describe the job of a firefighter during a typical day.",
    "Give a short history of the bicycle.",
    "Write a review of an imaginary restaurant.",
    "Explain what inflation is with a simple example.",
    "Describe how a caterpillar becomes a moth, in the style of a nature documentary.",
    "Write a set of rules for a new playground game.",
    "Explain how the moon causes tides.",
    "Write a story in which two strangers share an umbrella.",
]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class DataPathError(ValueError):
    """A data path names an environment variable that is not set."""


def resolve_path(path: str) -> Path:
    """``path`` with ``~`` and environment variables (``$LINEARIZE_DATA``, ``${HOME}``) expanded."""
    expanded = os.path.expandvars(os.path.expanduser(path))
    missing = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if missing:
        raise DataPathError(
            f"the data path {path!r} uses ${missing[0]}, which is not set: export {missing[0]}=/path/to/the/folder"
        )
    return Path(expanded)


def _prompt_of(row: dict) -> str:
    text = row.get("instruction") or row.get("prompt") or row.get("text")
    if not isinstance(text, str):
        raise ValueError(f"a prompt row needs an 'instruction', 'prompt' or 'text' string, got keys {sorted(row)}")
    return f"{text}\n\n{row['input']}" if row.get("input") else text


def _read_prompts(path: str) -> list[str]:
    """Prompts from a file: one per line, JSON lines, or a JSON array of rows (Alpaca's format:
    ``instruction`` plus an optional ``input``)."""
    file = resolve_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file not found: {file}")
    text = file.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return [_prompt_of(row) for row in json.loads(text)]
    prompts = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            prompts.append(_prompt_of(json.loads(line)) if line.startswith("{") else line)
    return prompts


def teacher_prompts(spec) -> list[str]:
    prompts = _read_prompts(spec.path) if spec.path else BUILTIN_PROMPTS
    half = prompts[0::2] if spec.split == "train" else prompts[1::2]
    if not half:
        raise ValueError(f"no prompts for split {spec.split!r} (a prompt file needs at least two prompts)")
    rng = random.Random(spec.seed)
    return [rng.choice(half) for _ in range(spec.samples)]


@torch.no_grad()
def generate_teacher_texts(model, tokenizer, spec, model_reference: str) -> list[str]:
    """Sample ``spec.samples`` texts from the teacher (prompt and answer, with the chat
    template's markup), cached on disk by every setting that determines them."""
    from tqdm.auto import tqdm

    prompts = teacher_prompts(spec)
    key = json.dumps(
        [model_reference, prompts, spec.max_new_tokens, spec.temperature, spec.seed, spec.chat_template], sort_keys=True
    )
    path = cache_dir() / "teacher-text" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".jsonl")
    if path.is_file():
        return [json.loads(line)["text"] for line in path.read_text().splitlines()]
    from .convert import attention_mode

    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    try:
        with attention_mode(model, "teacher"):
            for start in tqdm(range(0, len(prompts), spec.batch_size), desc="teacher writes text", unit="batch"):
                batch = [_format_prompt(tokenizer, p, spec.chat_template) for p in prompts[start : start + spec.batch_size]]
                enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=spec.temperature,
                    top_p=0.95,
                    max_new_tokens=spec.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )
                for row, mask in zip(out, enc["attention_mask"]):
                    row = row[int((mask == 0).sum()) :]  # drop left padding
                    texts.append(tokenizer.decode(row, skip_special_tokens=False).replace(tokenizer.pad_token, ""))
    finally:
        tokenizer.padding_side = padding_side
        torch.random.set_rng_state(generator_state)
    _atomic_write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def _format_prompt(tokenizer, prompt: str, chat_template: bool) -> str:
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return prompt


def _data_files(path: Path, suffixes: tuple[str, ...]) -> list[str]:
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in suffixes)
        if not files:
            raise FileNotFoundError(f"no {'/'.join(suffixes)} files under {path}")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return [str(path)]


def load_texts(spec, tokenizer=None) -> list[str]:
    """Texts of a ``text``, ``jsonl``, ``parquet`` or ``hub`` data spec, through ``datasets``.

    ``spec.format``: ``text`` reads the column ``spec.field``; ``alpaca`` joins ``instruction``,
    ``input`` and ``output`` into a user turn and an assistant turn; ``messages`` reads a list of
    ``{"role", "content"}`` turns from ``spec.field``. The last two go through the tokenizer's
    chat template (plain ``role: content`` lines if it has none)."""
    import datasets

    builder, suffixes = {"text": ("text", (".txt", ".md")), "jsonl": ("json", (".jsonl", ".json")),
                         "parquet": ("parquet", (".parquet",))}.get(spec.source, (None, ()))
    if spec.source == "hub":
        try:
            ds = datasets.load_dataset(spec.path, split=spec.split)
        except Exception as err:  # offline and uncached, wrong id, ...
            raise RuntimeError(
                f"could not load the Hub data set {spec.path!r} (split {spec.split!r}): {str(err).splitlines()[0]}. "
                "Offline, only data sets already in the local Hugging Face cache load; or point the recipe at local files."
            ) from None
    else:
        files = _data_files(resolve_path(spec.path), suffixes)
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    fmt = getattr(spec, "format", "text")
    needed = {"text": [spec.field], "messages": [spec.field], "alpaca": ["instruction", "output"]}[fmt]
    missing = [f for f in needed if f not in ds.column_names]
    if missing:
        raise KeyError(
            f"data {spec.path}: no field {missing[0]!r} (format {fmt!r}); its fields are {ds.column_names}. "
            "Set data.field, or data.format to text | alpaca | messages"
        )
    if spec.max_documents:
        ds = ds.select(range(min(spec.max_documents, len(ds))))
    if fmt == "text":
        return [t for t in ds[spec.field] if isinstance(t, str) and t.strip()]
    texts = []
    for row in ds:
        if fmt == "alpaca":
            user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            turns = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        else:
            turns = row[spec.field]
        texts.append(format_chat(tokenizer, turns, spec.chat_template))
    return texts


def format_chat(tokenizer, turns: list[dict], chat_template: bool = True) -> str:
    """A conversation as one training text, through the tokenizer's chat template."""
    if chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False)
    return "\n".join(f"{t['role']}: {t['content']}" for t in turns)


def passkey_texts(spec, tokenizer, seq_len: int) -> list[str]:
    """``spec.samples`` passkey-retrieval texts with their answers, each at most ``spec.length``
    (default ``seq_len``) tokens with EOS: the evaluation's format (:mod:`linearize.eval.passkey`)
    with the key at a uniformly random depth. Keys and depths come from ``spec.seed`` in a stream
    of their own, apart from the evaluation's."""
    from .eval.haystack import fit_units
    from .eval.passkey import passkey_prompt

    length = spec.length or seq_len
    rng = random.Random(f"train-passkey-{spec.seed}")
    texts, hint = [], 64
    for _ in range(spec.samples):
        key, depth = str(rng.randint(10000, 99999)), rng.random()
        answer = f" {key}."
        room = length - len(tokenizer(answer, add_special_tokens=False)["input_ids"]) - 1  # the answer and EOS
        hint, prompt = fit_units(tokenizer, lambda n: passkey_prompt(n, depth, key), room, start=hint)
        hint = max(hint, 1)
        texts.append(prompt + answer)
    return texts


def get_texts(spec, model=None, tokenizer=None, model_reference: str = "", seq_len: int = 1024) -> list[str]:
    if spec.source == "passkey":
        return passkey_texts(spec, tokenizer, seq_len)
    if spec.source == "teacher":
        if model is None:
            raise ValueError("teacher-generated data needs the teacher model")
        return generate_teacher_texts(model, tokenizer, spec, model_reference)
    return load_texts(spec, tokenizer)


@dataclass
class Blocks:
    """Token blocks ``input_ids [N, L]`` with ``attention_mask [N, L]`` (1 = real token; only
    the last block of a packed stream may end in padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index) -> "Blocks":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Blocks(self.input_ids[index], self.attention_mask[index])

    def tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())

    def to(self, device) -> "Blocks":
        return Blocks(self.input_ids.to(device), self.attention_mask.to(device))

    def model_inputs(self) -> dict:
        """``input_ids`` and, only where some position is padding, ``attention_mask`` (so the
        common all-real case keeps the attention's fast causal path)."""
        if bool(self.attention_mask.all()):
            return {"input_ids": self.input_ids}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def as_blocks(blocks) -> Blocks:
    """:class:`Blocks` from Blocks or a plain ``[N, T]`` tensor of token ids (all real)."""
    if isinstance(blocks, Blocks):
        return blocks
    return Blocks(blocks, torch.ones_like(blocks))


def pack(texts: list[str], tokenizer, seq_len: int) -> Blocks:
    """Tokenise, join documents with EOS, and cut the stream into blocks of ``seq_len`` tokens.

    Every token of the stream lands in exactly one block: the tail that does not fill a block
    becomes a last block right-padded with the pad token (masked out)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream.extend(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            stream.append(eos)
    if not stream:
        raise ValueError("the data holds no tokens")
    n = -(-len(stream) // seq_len)
    pad = n * seq_len - len(stream)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    ids = torch.tensor(stream + [pad_id] * pad, dtype=torch.long).view(n, seq_len)
    mask = torch.ones(n * seq_len, dtype=torch.long)
    if pad:
        mask[-pad:] = 0
    return Blocks(ids, mask.view(n, seq_len))


def pack_each(texts: list[str], tokenizer, seq_len: int) -> Blocks:
    """One right-padded block per text (a text longer than ``seq_len`` raises)."""
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    ids = torch.full((len(texts), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros(len(texts), seq_len, dtype=torch.long)
    for i, text in enumerate(texts):
        row = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(row) > seq_len:
            raise ValueError(f"a {len(row)}-token text does not fit one {seq_len}-token block")
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return Blocks(ids, mask)


def concat_blocks(parts: list[Blocks]) -> Blocks:
    return Blocks(torch.cat([b.input_ids for b in parts]), torch.cat([b.attention_mask for b in parts]))


def build_blocks(data, tokenizer, seq_len: int, model=None, model_reference: str = "", log=None) -> Blocks:
    """The blocks of a stage's ``data``: one source or a list of them (a mix), each source packed
    on its own (``passkey`` samples one a block, the others as a stream) and the blocks joined.
    With ``log``, a mix reports the tokens each source gives."""
    specs = data if isinstance(data, list) else [data]
    parts = []
    for spec in specs:
        texts = get_texts(spec, model, tokenizer, model_reference, seq_len)
        parts.append(pack_each(texts, tokenizer, seq_len) if spec.source == "passkey" else pack(texts, tokenizer, seq_len))
    if log is not None and len(parts) > 1:
        total = sum(b.tokens() for b in parts)
        log("data mix: " + ", ".join(f"{spec.source}{' ' + Path(spec.path).name if spec.path else ''} "
                                     f"{b.tokens():,} tokens ({b.tokens() / total:.0%})" for spec, b in zip(specs, parts)))
    return parts[0] if len(parts) == 1 else concat_blocks(parts)


def batch_indices(num_blocks: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The block indices of batch ``step`` in an endless stream of shuffled epochs.

    Epoch ``e`` is a permutation of all blocks drawn from ``seed`` and ``e``; batches are
    consecutive slices of the concatenated epochs, so every block appears exactly once per
    epoch (a batch may straddle two epochs) and batch ``step`` is a pure function of its
    arguments: a resumed run needs only the step to find its place in the data."""
    if num_blocks < 1:
        raise ValueError("no blocks to draw batches from")
    start = step * batch_size
    out = []
    epoch = start // num_blocks
    offset = start - epoch * num_blocks
    while len(out) < batch_size:
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = perm[offset : offset + batch_size - len(out)]
        out.extend(take.tolist())
        epoch, offset = epoch + 1, 0
    return torch.tensor(out, dtype=torch.long)
