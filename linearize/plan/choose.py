"""Choosing one option per layer: the least total predicted error within the budget, exactly.

The problem is a multiple-choice knapsack. Layer ``i`` (a group) has options ``o`` with an
integer cost ``c[i][o]`` (:mod:`linearize.plan.budget`) and a predicted error ``e[i][o] >= 0``
(softmax: 0); choose one option per layer with ``sum_i c[i][o_i] <= C`` and the least
``sum_i e[i][o_i]``.

Method: dynamic programming over Pareto frontiers, layer by layer (the list algorithm of
Nemhauser and Ullmann, "Discrete dynamic programming and capital allocation", Management
Science 15(9), 1969). After layers ``0..i-1`` the frontier ``P_i`` holds every partial plan
that no other dominates (no other has cost <= and error <= with one of them strict), sorted by
cost with the error falling. ``P_{i+1}`` extends each point by each option of layer ``i``,
drops what cannot be completed within ``C`` even with the cheapest options of the layers left,
and prunes the dominated. The least-error point of ``P_L`` is the plan (ties: the cheaper).

Why it is exact: if a partial plan is dominated, swapping it for the one that dominates it in
any completion keeps the completion within the budget and does not raise its error, so an
optimal plan is found among the extensions of frontier points at every step. No cost is
rounded (they are integers, compared exactly), so nothing is lost to discretisation and the
budget is never exceeded. The tests compare it with brute force on random instances.

Why it is small: every layer's options cost the same here (the costs come from the model's
shapes and the per-option state, and all decoder layers share them), so a partial plan's cost
depends only on how many layers took each option: after ``i`` layers with ``K + 1`` options
there are at most ``C(i + K, K)`` distinct costs, and a frontier holds at most one point per
cost (for 30 layers and 4 options at most 5,456). The alternatives were worse fits: dynamic
programming over a discretised cost must round (a softmax layer's cache at 32K tokens is
~10^7 bytes) or run over millions of cells, and a Lagrangian relaxation is exact only where its
duality gap closes, which for integer choices it need not.

The same frontiers give, for every layer and option, the least total error of a plan that puts
that option on that layer (the prefix frontier of the layers before, the suffix frontier of the
layers after, merged in one pass): the plan table shows, as a choice's reason, what the best
plan without it would cost in error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .budget import Costs


@dataclass
class Solution:
    choice: list[int]  # the option of each layer
    error: float  # the total predicted error of the plan
    cost: int
    best_with: list[list[float]]  # [layer][option]: least total error of a plan with that option there (inf: none fits)


def _extend(frontier: list[tuple], costs: list[int], errors: list[float], limit: int) -> list[tuple]:
    """Extend every ``(cost, error, ...)`` point by every option; keep those within ``limit``
    that no other dominates. Points are ``(cost, error, parent index, option)``, by cost."""
    grown = [(c + oc, e + oe, index, o)
             for index, (c, e, *_rest) in enumerate(frontier)
             for o, (oc, oe) in enumerate(zip(costs, errors))
             if c + oc <= limit and oe < math.inf]
    grown.sort(key=lambda p: (p[0], p[1]))
    kept, best = [], math.inf
    for p in grown:
        if p[1] < best:
            kept.append(p)
            best = p[1]
    return kept


def _frontiers(cost: list[list[int]], error: list[list[float]], capacity: int) -> list[list[tuple]]:
    """``P_0 .. P_L``: the frontier of each prefix of layers, pruned by what the rest needs at least."""
    L = len(cost)
    rest = [0] * (L + 1)  # rest[i]: the least cost of layers i..L-1
    for i in range(L - 1, -1, -1):
        rest[i] = rest[i + 1] + min(cost[i])
    out = [[(0, 0.0, -1, -1)]]
    for i in range(L):
        out.append(_extend(out[-1], cost[i], error[i], capacity - rest[i + 1]))
    return out


def _best_within(prefix: list[tuple], suffix: list[tuple], limit: int) -> float:
    """The least ``p.error + s.error`` over ``p`` in ``prefix``, ``s`` in ``suffix`` with
    ``p.cost + s.cost <= limit``. Both are frontiers (cost up, error down): one pass."""
    best, j = math.inf, len(suffix) - 1
    for c, e, *_ in prefix:
        while j >= 0 and c + suffix[j][0] > limit:
            j -= 1
        if j < 0:
            break
        best = min(best, e + suffix[j][1])
    return best


def solve(costs: Costs, errors: list[list[float]]) -> Solution | None:
    """The least-error plan within ``costs.capacity`` (``None`` if no plan fits)."""
    cost, C, L = costs.cost, costs.capacity, len(costs.cost)
    forward = _frontiers(cost, errors, C)
    if not forward[-1]:
        return None
    point = min(forward[-1], key=lambda p: (p[1], p[0]))
    total_error, total_cost = point[1], point[0]
    choice = [0] * L
    for i in range(L, 0, -1):  # walk the parent links back
        choice[i - 1] = point[3]
        point = forward[i - 1][point[2]]
    backward = _frontiers(cost[::-1], errors[::-1], C)  # backward[k]: the frontier of the last k layers
    best_with = [[_best_within(forward[i], backward[L - 1 - i], C - cost[i][o]) + errors[i][o] for o in range(len(cost[i]))]
                 for i in range(L)]
    return Solution(choice, total_error, total_cost, best_with)


def cheapest_choice(costs: Costs) -> list[int]:
    """Each layer's cheapest option (the first of equals): the plan with the least cost."""
    return [min(range(len(row)), key=lambda o: (row[o], o)) for row in costs.cost]
