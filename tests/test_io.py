"""Saved models rebuild exactly, in a fresh process."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import make_base_folder
from linearize import ConversionSpec, convert_model, load, save, students
from linearize.io import atomic_folder


@pytest.fixture
def qwen2_folder(tmp_path):
    return make_base_folder(tmp_path / "base", family="qwen2")


def test_save_then_load_in_fresh_process_gives_identical_logits(qwen2_folder, tmp_path):
    base_folder = qwen2_folder
    from linearize.models import load_teacher

    model, tokenizer, source = load_teacher(str(base_folder))
    convert_model(model, ConversionSpec("lolcats", layers=[0, 2], settings={"window_size": 4, "sink_size": 2}))
    with torch.no_grad():
        for s in students(model).values():
            for _, p in s.student_parameters():
                p.add_(torch.randn_like(p) * 0.5)
    x = torch.randint(1, 97, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).logits
    out = save(model, tmp_path / "converted", tokenizer, source.reference)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("tokenizer") and p.suffix != ".jinja") == [
        "linearize.json",
        "students.safetensors",
    ]
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch, linearize\n"
        "m = linearize.load(sys.argv[1])\n"
        "x = torch.load(sys.argv[2])\n"
        "with torch.no_grad(): torch.save(m(x).logits, sys.argv[3])\n"
        "print(type(m.model.layers[0].self_attn).__name__, type(m.model.layers[1].self_attn).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["LolcatsStudent", "Qwen2Attention"]
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_saving_replaces_an_old_folder_only_when_complete(base_folder, tmp_path):
    from linearize.models import load_teacher

    model, tokenizer, source = load_teacher(str(base_folder))
    convert_model(model, ConversionSpec("hedgehog"))
    target = tmp_path / "out"
    save(model, target, base_model=source.reference)
    first = json.loads((target / "linearize.json").read_text())

    class Boom(Exception):
        pass

    def write(tmp):
        (tmp / "partial").write_text("half")
        raise Boom

    with pytest.raises(Boom):
        atomic_folder(target, write)
    assert json.loads((target / "linearize.json").read_text()) == first
    assert not (target / "partial").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_loading_a_folder_that_is_not_a_converted_model_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a linearize model folder"):
        load(tmp_path)


def test_a_moved_base_model_is_named_at_load_time(tmp_path):
    import shutil

    from linearize.models import load_teacher

    base = make_base_folder(tmp_path / "base")
    model, tokenizer, source = load_teacher(str(base))
    convert_model(model, ConversionSpec("hedgehog", layers=[1]))
    x = torch.randint(1, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).logits
    out = save(model, tmp_path / "converted", tokenizer, source.reference)
    shutil.move(str(base), str(tmp_path / "moved"))
    from linearize.models import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"which cannot be loaded here .*name it: linearize.load\(path, base_model=\.\.\.\)"):
        load(out)
    loaded = load(out, base_model=str(tmp_path / "moved"))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)
    assert loaded.linearize_base == str(tmp_path / "moved")


def test_per_layer_students_and_settings_convert_and_reload(tmp_path):
    from conftest import logits_by_form, token_ids
    from linearize.models import load_teacher

    base = make_base_folder(tmp_path / "base")
    model, tokenizer, source = load_teacher(str(base))
    spec = ConversionSpec("lolcats", layers=[0, 1, 2], settings={"window_size": 4, "sink_size": 1},
                          per_layer={1: {"window_size": 2}, 2: {"kind": "hedgehog", "feature_dim": 8}})
    convert_model(model, spec)
    s = students(model)
    assert (s[0].kind, s[0].settings.window_size, s[0].settings.sink_size) == ("lolcats", 4, 1)
    assert (s[1].kind, s[1].settings.window_size, s[1].settings.sink_size) == ("lolcats", 2, 1)
    assert (s[2].kind, s[2].settings.feature_dim) == ("hedgehog", 8)
    with torch.no_grad():
        for st in s.values():
            for _, p in st.student_parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    x = token_ids(2, 11)
    forms = logits_by_form(model, x, forms=("chunk", "recurrent"))
    assert torch.allclose(forms["chunk"], forms["recurrent"], atol=1e-5, rtol=1e-5)
    out = save(model, tmp_path / "converted", tokenizer, source.reference)
    assert json.loads((out / "linearize.json").read_text())["conversion"]["per_layer"] == {
        "1": {"window_size": 2}, "2": {"kind": "hedgehog", "feature_dim": 8}}
    loaded = load(out)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert [(st.kind, st.settings) for st in students(loaded).values()] == [(st.kind, st.settings) for st in s.values()]


def test_per_layer_settings_for_a_layer_that_is_not_converted_are_refused(base_folder):
    from linearize.models import load_teacher

    model, _, _ = load_teacher(str(base_folder))
    with pytest.raises(ValueError, match=r"per-layer settings for layer\(s\) \[3\], which are not converted"):
        convert_model(model, ConversionSpec("lolcats", layers=[0, 1], per_layer={3: {"window_size": 2}}))
