"""Feature maps: NP-Map (STILL, Sec. 3.2) on its own and inside a converted model."""

import torch

from conftest import logits_by_form, relative_error, tiny_model
from linearize import ConversionSpec, convert_model, students
from linearize.feature_maps import FEATURE_MAPS, NPMapFeatureMap, build_feature_map
from linearize.recipe import parse_recipe


def test_npmap_is_registered_with_the_hedgehog_signature():
    fm = build_feature_map("npmap", 4, 16, 8)
    assert FEATURE_MAPS["npmap"] is NPMapFeatureMap
    assert fm.feature_size == 16
    assert fm(torch.randn(2, 4, 5, 16)).shape == (2, 4, 5, 16)
    assert build_feature_map("npmap", 4, 16).feature_size == 32


def test_npmap_at_init_preserves_the_norm_and_is_the_reflection():
    torch.manual_seed(0)
    fm = NPMapFeatureMap(4, 16)
    x = torch.randn(3, 4, 7, 16) * torch.rand(3, 4, 7, 1) * 10
    fm.requires_grad_(False)
    u = fm.directions(x)
    assert torch.allclose(u.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    # with f = identity, u is exactly the Householder reflection of x (no rescaling needed)
    w = fm.reflection / fm.reflection.norm(dim=-1, keepdim=True)
    H = torch.eye(16) - 2 * w[:, :, None] * w[:, None, :]  # [H, D, D]
    expected = torch.einsum("hde,bhte->bhtd", H, x)
    assert relative_error(u, expected) <= 1e-5
    assert relative_error(u, x) > 0.1  # the reflection really acts
    phi = fm(x)
    assert torch.allclose(phi, torch.cat([torch.softmax(u, -1), torch.softmax(-u, -1)], -1))


def test_npmap_keeps_the_norm_after_training_like_changes():
    torch.manual_seed(1)
    fm = NPMapFeatureMap(2, 16, 8)  # rectangular f: ||f(Hx)|| != ||x|| but u is rescaled
    with torch.no_grad():
        fm.weight.add_(torch.randn_like(fm.weight))
    x = torch.randn(2, 2, 9, 16) * 3
    assert torch.allclose(fm.directions(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)


def test_npmap_is_per_head_and_gradients_reach_its_parameters():
    torch.manual_seed(2)
    fm = NPMapFeatureMap(3, 8)
    x = torch.randn(2, 3, 5, 8)
    before = fm(x)
    with torch.no_grad():  # change head 1 only
        fm.weight[1].add_(torch.randn(8, 8))
        fm.reflection[1].add_(torch.randn(8))
    after = fm(x)
    assert torch.equal(after[:, 0], before[:, 0]) and torch.equal(after[:, 2], before[:, 2])
    assert not torch.allclose(after[:, 1], before[:, 1])
    (fm(x) * torch.randn(2, 3, 5, 16)).sum().backward()
    for p in (fm.weight, fm.reflection):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_hedgehog_student_with_npmap_parallel_equals_recurrent():
    recipe = parse_recipe(
        {
            "model": "tiny",
            "students": {"kind": "hedgehog", "feature_map": "npmap"},
            "stages": [{"stage": "attention_transfer", "data": {"source": "teacher"}, "steps": 1}],
        }
    )
    s = recipe.students
    model = tiny_model("qwen3")
    convert_model(model, ConversionSpec(s.kind, s.layers, s.settings))
    fm = students(model)[0].feature_map_q
    assert isinstance(fm, NPMapFeatureMap)
    assert torch.equal(students(model)[0].feature_map_k.reflection, fm.reflection)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # off the initialisation
        for st in students(model).values():
            for _, p in st.student_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    for T in (1, 13, 70):
        x = torch.randint(1, 97, (2, T), generator=torch.Generator().manual_seed(T))
        logits = logits_by_form(model, x, ("chunk", "recurrent"))
        assert relative_error(logits["recurrent"], logits["chunk"]) <= 1e-5
