"""Data: files and instruction rows through `datasets`, packing, and the batch order."""

import json
from collections import Counter

import pytest
import torch

from conftest import WORDS, synthetic_text
from linearize.data import batch_indices, load_texts, pack
from linearize.recipe import DataSpec


@pytest.fixture
def tokenizer(base_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_folder)


def test_pack_keeps_every_token_exactly_once(tokenizer):
    texts = [synthetic_text(n, seed=n) for n in (5, 40, 17, 63)]
    blocks = pack(texts, tokenizer, seq_len=16)
    stream = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    real = blocks.input_ids[blocks.attention_mask.bool()].tolist()
    assert real == stream  # in order, none lost, none repeated
    assert blocks.attention_mask[:-1].all()  # only the last block may be padded
    assert blocks.tokens() == len(stream) and len(blocks) == -(-len(stream) // 16)


@pytest.mark.parametrize("num_blocks,batch_size", [(10, 3), (12, 4), (7, 7), (5, 8)])
def test_batches_cover_every_block_once_per_epoch(num_blocks, batch_size):
    epochs = 3
    steps = epochs * num_blocks // batch_size
    drawn = torch.cat([batch_indices(num_blocks, batch_size, s, seed=5) for s in range(steps)]).tolist()
    for e in range(len(drawn) // num_blocks):  # each whole epoch is a permutation
        assert sorted(drawn[e * num_blocks : (e + 1) * num_blocks]) == list(range(num_blocks))
    assert max(Counter(drawn).values()) - min(Counter(drawn).values()) <= 1
    # a pure function of (step, seed): a resumed run finds the same batches; another seed does not
    assert batch_indices(num_blocks, batch_size, steps - 1, seed=5).tolist() == drawn[-batch_size:]
    orders = {tuple(batch_indices(num_blocks, num_blocks, 0, seed=s).tolist()) for s in range(4)}
    assert len(orders) > 1 or num_blocks == 1


def test_text_jsonl_parquet_and_folders(tmp_path):
    import pandas as pd

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha beta\ngamma")
    (tmp_path / "docs" / "b.txt").write_text("delta")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(4)))
    pd.DataFrame({"text": ["one", "two"]}).to_parquet(tmp_path / "d.parquet")
    assert sorted(load_texts(DataSpec(source="text", path=str(tmp_path / "docs")))) == ["alpha beta\ngamma", "delta"]
    assert load_texts(DataSpec(source="jsonl", path=str(tmp_path / "d.jsonl"), field="body", max_documents=2)) == ["doc 0", "doc 1"]
    assert load_texts(DataSpec(source="parquet", path=str(tmp_path / "d.parquet"))) == ["one", "two"]
    with pytest.raises(KeyError, match=r"no field 'text' \(format 'text'\); its fields are \['body'\]"):
        load_texts(DataSpec(source="jsonl", path=str(tmp_path / "d.jsonl")))


def test_instruction_rows_use_the_chat_template(tmp_path, tokenizer):
    rows = [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Hi", "input": "", "output": "Hello"}]
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = load_texts(DataSpec(source="jsonl", path=str(tmp_path / "alpaca.jsonl"), format="alpaca"), tokenizer)
    end = WORDS[1]
    assert texts == [f"<user> Add\n\n2 and 3 {end} <assistant> 5 {end} ", f"<user> Hi {end} <assistant> Hello {end} "]
    chats = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    texts = load_texts(DataSpec(source="jsonl", path=str(tmp_path / "chat.jsonl"), format="messages", field="messages"), tokenizer)
    assert texts == [f"<user> Q {end} <assistant> A {end} "]


def test_offline_uncached_hub_data_set_fails_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(RuntimeError, match=r"could not load the Hub data set 'someone/nothing-here' \(split 'train'\).*Offline"):
        load_texts(DataSpec(source="hub", path="someone/nothing-here"))
