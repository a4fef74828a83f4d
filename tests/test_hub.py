"""Publishing: the model card, the dry-run folder, the upload calls (mocked: no network), and
loading a Hub id that is not there."""

import json

import pytest
import yaml

from conftest import make_base_folder
from linearize import ConversionSpec, convert_model, save
from linearize.hub import PushError, model_card, push

REPORT = {
    "device": "cpu",
    "teacher_perplexity": 6.948,
    "student_perplexity": 6.911,
    "eval_tokens": 2048,
    "stages": [
        {"stage": "attention_transfer", "steps": 60, "tokens": 30600, "seconds": 136.2, "perplexity": 7.236},
        {"stage": "lora", "steps": 20, "tokens": 10210, "seconds": 164.9, "perplexity": 6.911},
    ],
    "heldout_transfer": {
        "before": {"relative_error": {"0": 0.38, "1": 0.44}, "mean_relative_error": 0.41},
        "after": {"relative_error": {"0": 0.05, "1": 0.06}, "mean_relative_error": 0.055},
    },
}


@pytest.fixture
def converted_folder(tmp_path):
    from linearize.models import load_teacher

    base = make_base_folder(tmp_path / "base")
    model, tokenizer, source = load_teacher(str(base))
    convert_model(model, ConversionSpec("lolcats", layers=[0, 1], settings={"window_size": 4}))
    recipe = {"model": "smollm2-135m-instruct", "students": {"kind": "lolcats", "window_size": 4}}
    return save(model, tmp_path / "converted", tokenizer, "smollm2-135m-instruct", recipe, REPORT)


def test_model_card_front_matter_tables_and_usage(converted_folder):
    card = model_card(converted_folder, "someone/smol-lolcats")
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["library_name"] == "linearize" and "lolcats" in front["tags"]
    assert "| teacher | 6.948 | 1.000x |" in card
    assert "| student after lora | 6.911 | 0.995x |" in card
    assert "| attention_transfer | 60 | 30,600 | 136 s |" in card and "Total: 40,810 training tokens" in card
    assert "| 1 | 0.4400 | 0.0600 |" in card and "| mean | 0.4100 | 0.0550 |" in card
    assert 'linearize.load("someone/smol-lolcats", return_tokenizer=True)' in card


def test_card_without_report_and_with_a_local_base(tmp_path):
    from linearize.models import load_teacher

    base = make_base_folder(tmp_path / "base")
    model, tokenizer, _ = load_teacher(str(base))
    convert_model(model, ConversionSpec("hedgehog"))
    folder = save(model, tmp_path / "c", tokenizer, str(base))
    card = model_card(folder)
    assert "base_model" not in yaml.safe_load(card.split("---")[1])  # a local folder is no Hub link
    assert "## Evaluation" not in card and "## Training" not in card


def test_dry_run_writes_exactly_the_upload(converted_folder, tmp_path):
    out = push(converted_folder, "someone/smol-lolcats", dry_run_dir=tmp_path / "dry")
    files = {p.name for p in (tmp_path / "dry").iterdir()}
    assert files == {p.name for p in converted_folder.iterdir()} | {"README.md"}
    assert out == str(tmp_path / "dry")
    assert json.loads((tmp_path / "dry" / "linearize.json").read_text()) == json.loads((converted_folder / "linearize.json").read_text())


def test_push_creates_the_repo_and_uploads_the_staged_folder(converted_folder, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, **kw):
        from pathlib import Path

        calls["upload"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()),
                           (Path(folder_path) / "README.md").read_text())
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    url = push(converted_folder, "someone/smol-lolcats", private=True)
    assert url == "https://huggingface.co/someone/smol-lolcats"
    assert calls["create"][0] == "someone/smol-lolcats" and calls["create"][1]["private"] is True
    dry = push(converted_folder, "someone/smol-lolcats", dry_run_dir=tmp_path / "dry")
    from pathlib import Path

    assert calls["upload"][1] == sorted(p.name for p in Path(dry).iterdir())
    assert calls["upload"][2] == (Path(dry) / "README.md").read_text()


def test_push_failure_says_what_to_do(converted_folder, monkeypatch):
    import huggingface_hub

    def refuse(self, *a, **kw):
        raise RuntimeError("401 Client Error: Unauthorized")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    with pytest.raises(PushError, match=r"could not push to a/b: RuntimeError: 401.*hf auth login"):
        push(converted_folder, "a/b")


def test_cli_push_dry_run_and_errors(converted_folder, tmp_path, capsys):
    from linearize.cli import main

    assert main(["push", str(converted_folder), "someone/x", "--dry-run", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "README.md").is_file() and "dry run" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["push", str(tmp_path / "empty"), "someone/x", "--dry-run", str(tmp_path / "e")]) == 2
    assert "is not a linearize model folder" in capsys.readouterr().err


def test_loading_an_uncached_hub_id_offline_says_so(monkeypatch, tmp_path):
    from linearize import load
    from linearize.models import ModelLoadError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"someone/nothing-here is not a local folder, and the Hub repo could not be fetched"):
        load("someone/nothing-here")


def test_dry_run_never_replaces_an_unrelated_folder(converted_folder, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(PushError, match="is not an earlier upload folder"):
        push(converted_folder, "a/b", dry_run_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(PushError, match="must lie outside the model folder"):
        push(converted_folder, "a/b", dry_run_dir=converted_folder / "upload")
    push(converted_folder, "a/b", dry_run_dir=tmp_path / "dry")
    push(converted_folder, "a/b", dry_run_dir=tmp_path / "dry")  # an earlier upload folder is replaced
    assert (tmp_path / "dry" / "README.md").is_file()
