"""A converted model saved by `linearize convert` (tests/data/reference-artifact, rebuilt by
scripts/reference_artifact.py) loads in this version and gives the logits saved beside it: the
small artifact (students, LoRA adapters, per-layer students, the base model by name) rebuilds
the same model."""

from pathlib import Path

import torch
from safetensors.torch import load_file

import linearize
from linearize.students import HedgehogStudent, LolcatsStudent

FOLDER = Path(__file__).parent / "data" / "reference-artifact"


def test_reference_artifact_rebuilds_the_model_and_its_saved_logits(teacher):
    expected = load_file(str(FOLDER / "expected.safetensors"))
    model, tokenizer = linearize.load(FOLDER, return_tokenizer=True)
    built = linearize.students(model)
    assert sorted(built) == [0, 14, 29]
    assert type(built[0]) is LolcatsStudent and built[0].window == 16 and built[0].sinks == 2
    assert type(built[29]) is HedgehogStudent and built[29].feature_map_q.feature_size == 16
    assert any("lora_A" in name for name, _ in model.named_parameters())
    ids = tokenizer(tokenizer.decode(expected["input_ids"]), return_tensors="pt")["input_ids"][0]
    assert torch.equal(ids, expected["input_ids"])
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    assert (logits[expected["positions"]] - expected["logits"]).abs().max() <= 1e-4
    assert torch.equal(logits.argmax(-1), expected["top_tokens"])
    generated = model.generate(ids[None], max_new_tokens=len(expected["generated"]), do_sample=False)[0, len(ids):]
    assert torch.equal(generated, expected["generated"])
