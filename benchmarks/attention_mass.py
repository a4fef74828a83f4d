"""Where attention goes at long context: a converted model's window and linear terms against the
softmax attention they replace, layer by layer, in one run.

    python benchmarks/attention_mass.py runs/smoke --text ../shared/data/wikitext-2-raw/wiki.test.raw \
        --length 2048 --positions 255,511,1023,2047

For a model converted to LoLCATs students (``linearize.load``) and the first
``--length`` tokens of a text, every student layer's queries and keys (the model's own
projections, LoRA included) give, at each query position ``t`` of ``--positions``:

* ``teacher window share``: the share of softmax attention ``softmax(q_t . k_s / sqrt(d))`` on the
  keys the student treats with softmax terms (its window and sinks);
* ``student window share``: the share of the student's normaliser that those softmax terms take,
  ``sum_win g e^(a-m) / (sum_win g e^(a-m) + sum_lin phi(q).phi(k))``;
* ``far mass``: the sum over the keys outside the window of what the student's linear terms
  should be to reproduce softmax exactly under the shared normaliser, ``g e^(a_ts - m_t)``
  (teacher), and of what they are, ``phi(q_t).phi(k_s)`` (student).

Then, at the last position, by distance, the mean per key of the target ``g e^(a-m)`` and of the
linear term ``phi(q).phi(k)`` and their ratio: above 1, the linear terms weigh a far key more
than softmax would, relative to the window. A
student whose linear terms overweigh far keys, even slightly, loses its window (and the local
context) as the context grows: the excess is summed over every far key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUCKETS = ((64, 128), (128, 256), (256, 512), (512, 1024), (1024, 2048), (2048, 4096), (4096, 8192),
           (8192, 16384), (16384, 32768))


def layer_inputs(model, ids):
    """Each student's input (hidden states and position embeddings) on ``ids``, from one forward."""
    from linearize import students

    captured = {}

    def hook(module, args, kwargs):
        captured[module.layer_idx] = (kwargs.get("hidden_states", args[0] if args else None),
                                      kwargs.get("position_embeddings"))

    handles = [s.register_forward_pre_hook(hook, with_kwargs=True) for s in students(model).values()]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def layer_mass(student, adapter, hidden, position_embeddings, positions):
    """One layer: per position, ``(teacher window share, student window share, far mass teacher,
    far mass student)`` averaged over heads, and the per-key ratio by distance at the last one."""
    from linearize.students.base import repeat_kv

    with torch.no_grad():
        q, k_kv, _ = adapter.project(student, hidden, position_embeddings)
        k = repeat_kv(k_kv, student.num_key_value_groups)
        fq, fk = student.feature_map_q(q.float()), student.feature_map_k(k.float())
        gamma = student.window_factor().float()  # [H]
        rows, ratios = [], {}
        for t in positions:
            a = torch.einsum("hd,hsd->hs", q[0, :, t].float(), k[0, :, : t + 1].float()) * student.scaling  # [H, t+1]
            pos = torch.arange(t + 1)
            win = (pos > t - student.window) | (pos < student.sinks)
            m = a[:, win].amax(-1, keepdim=True)
            target = gamma[:, None] * torch.exp(a - m)  # what a linear term must be to match softmax
            linear = torch.einsum("hf,hsf->hs", fq[0, :, t], fk[0, :, : t + 1])
            teacher_share = torch.softmax(a, -1)[:, win].sum(-1)
            window = target[:, win].sum(-1)
            student_share = window / (window + linear[:, ~win].sum(-1))
            rows.append((t, float(teacher_share.mean()), float(student_share.mean()),
                         float(target[:, ~win].sum(-1).mean()), float(linear[:, ~win].sum(-1).mean())))
        dist = positions[-1] - pos
        for lo, hi in BUCKETS:
            sel = ~win & (dist >= lo) & (dist < hi)
            if sel.any():
                ratios[(lo, hi)] = (float(target[:, sel].mean()), float(linear[:, sel].mean()))
    return rows, ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a converted-model folder (LoLCATs students)")
    parser.add_argument("--text", required=True, help="a text file")
    parser.add_argument("--length", type=int, default=2048, help="tokens of the text to read")
    parser.add_argument("--positions", default=None, help="query positions (default: 255, 511, ... up to length - 1)")
    parser.add_argument("--per-layer", action="store_true", help="print every layer, not only the mean over layers")
    args = parser.parse_args(argv)

    import linearize
    from linearize.architectures import adapter_for
    from linearize.students import LolcatsStudent

    model, tokenizer = linearize.load(args.model, return_tokenizer=True)
    ids = torch.tensor(tokenizer(Path(args.text).read_text(encoding="utf-8"))["input_ids"][: args.length])[None]
    if args.positions:
        positions = [int(p) for p in args.positions.split(",")]
    else:
        positions = [p for p in (255, 511, 1023, 2047, 4095, 8191, 16383, 32767) if p < ids.shape[1]]
    if not positions or max(positions) >= ids.shape[1]:
        raise SystemExit(f"positions must lie below the {ids.shape[1]} tokens read")
    students = {i: s for i, s in linearize.students(model).items() if isinstance(s, LolcatsStudent)}
    if not students:
        raise SystemExit(f"{args.model} has no LoLCATs student layers (window + linear terms)")
    adapter = adapter_for(model.config)
    inputs = layer_inputs(model, ids)
    per_layer = {i: layer_mass(s, adapter, *inputs[i], positions) for i, s in students.items()}

    print(f"{args.model}: {len(students)} student layers, the first {ids.shape[1]} tokens of {args.text}\n")
    print("| layer | position | teacher window share | student window share | far mass: softmax target | linear terms |")
    print("|---|---|---|---|---|---|")
    layers = list(per_layer) if args.per_layer else []
    for i in layers:
        for t, *vals in per_layer[i][0]:
            print(f"| {i} | {t} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    for j, t in enumerate(positions):
        vals = [sum(per_layer[i][0][j][c] for i in per_layer) / len(per_layer) for c in range(1, 5)]
        print(f"| mean | {t} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    print(f"\nper key, by distance from position {positions[-1]}, mean over layers: the softmax target "
          "g e^(a-m) and the linear term phi(q).phi(k)\n")
    common = [b for b in BUCKETS if all(b in r for _, r in per_layer.values())]
    target = [sum(r[b][0] for _, r in per_layer.values()) / len(per_layer) for b in common]
    linear = [sum(r[b][1] for _, r in per_layer.values()) / len(per_layer) for b in common]
    print("| distance | " + " | ".join(f"{lo}-{hi}" for lo, hi in common) + " |")
    print("|---|" + "---|" * len(common))
    print("| softmax target | " + " | ".join(f"{x:.5f}" for x in target) + " |")
    print("| linear term | " + " | ".join(f"{x:.5f}" for x in linear) + " |")
    print("| ratio | " + " | ".join(f"{y / x:.2f}" for x, y in zip(target, linear)) + " |")

if __name__ == "__main__":
    main()
