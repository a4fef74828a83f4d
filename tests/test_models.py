"""Model sources: Hub id, folder, GGUF, embedded; clear errors when one cannot be had."""

import pytest

from linearize.models import DEFAULT_MODEL, ModelLoadError, load_teacher, resolve_model


def test_offline_uncached_hub_id_fails_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"could not load 'nobody/no-such-model' from the Hugging Face Hub \(HF_HUB_OFFLINE is set\)"):
        load_teacher("nobody/no-such-model")


def test_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "x.gguf"))


def test_classification():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    embedded = resolve_model(DEFAULT_MODEL)
    assert embedded.kind == "embedded" and embedded.gguf_file.is_file()


def test_unsupported_architecture_from_a_folder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a")), unk_token="a").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'gpt2' is not supported; linearize converts these model types: llama, mistral, qwen2, qwen3"):
        load_teacher(str(tmp_path))


def test_a_copy_of_the_embedded_gguf_is_recorded_under_the_embedded_name(tmp_path):
    embedded = resolve_model(DEFAULT_MODEL).gguf_file
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / embedded.name).symlink_to(embedded)
    assert resolve_model(str(tmp_path / "copy" / embedded.name)).reference == DEFAULT_MODEL
    (tmp_path / embedded.name).write_bytes(b"GGUF not the same bytes")  # same name, other content
    other = resolve_model(str(tmp_path / embedded.name))
    assert other.kind == "gguf" and other.reference == str((tmp_path / embedded.name).resolve())
