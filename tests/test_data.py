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


def test_passkey_samples_are_one_block_each_with_their_answer(tokenizer):
    from linearize.data import build_blocks, passkey_texts

    spec = DataSpec(source="passkey", samples=6, seed=3)
    texts = passkey_texts(spec, tokenizer, seq_len=96)
    assert texts == passkey_texts(spec, tokenizer, seq_len=96)  # a pure function of the spec
    assert texts != passkey_texts(DataSpec(source="passkey", samples=6, seed=4), tokenizer, seq_len=96)
    for text in texts:
        key = text.rsplit(" ", 1)[1].rstrip(".")
        assert len(key) == 5 and key.isdigit()
        assert text.count(key) == 3  # twice in the hidden line, once as the answer
        assert text.endswith(f"What is the pass key? The pass key is {key}.")
    blocks = build_blocks(spec, tokenizer, 96)
    assert len(blocks) == 6
    lengths = blocks.attention_mask.sum(1)
    assert bool((lengths <= 96).all()) and bool((lengths > 96 - 8).all())  # filled to within one filler unit
    last = blocks.input_ids.gather(1, (lengths - 1)[:, None]).squeeze(1)
    assert bool((last == tokenizer.eos_token_id).all())  # each sample ends in its own block


def test_a_mix_joins_each_source_packed_on_its_own(tokenizer, tmp_path):
    from linearize.data import build_blocks

    (tmp_path / "a.txt").write_text(synthetic_text(50, seed=1))
    text_spec = DataSpec(source="text", path=str(tmp_path / "a.txt"))
    key_spec = DataSpec(source="passkey", samples=3)
    alone = [build_blocks(text_spec, tokenizer, 80), build_blocks(key_spec, tokenizer, 80)]
    mix = build_blocks([text_spec, key_spec], tokenizer, 80)
    assert len(mix) == len(alone[0]) + len(alone[1])
    assert torch.equal(mix.input_ids, torch.cat([alone[0].input_ids, alone[1].input_ids]))
    assert mix.tokens() == alone[0].tokens() + alone[1].tokens()


def test_prompts_from_an_alpaca_json_array(tmp_path):
    from linearize.data import _read_prompts

    rows = [{"instruction": "Sort these", "input": "b a", "output": "a b"}, {"instruction": "Say hi", "input": "", "output": "hi"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    assert _read_prompts(str(tmp_path / "alpaca.json")) == ["Sort these\n\nb a", "Say hi"]


def test_data_paths_expand_environment_variables(tmp_path, monkeypatch):
    from linearize.data import DataPathError, resolve_path

    monkeypatch.setenv("LINEARIZE_TEST_DATA", str(tmp_path))
    assert resolve_path("$LINEARIZE_TEST_DATA/x.txt") == tmp_path / "x.txt"
    monkeypatch.delenv("LINEARIZE_TEST_DATA")
    with pytest.raises(DataPathError, match=r"\$LINEARIZE_TEST_DATA, which is not set: export LINEARIZE_TEST_DATA="):
        resolve_path("${LINEARIZE_TEST_DATA}/x.txt")
