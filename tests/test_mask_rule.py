"""The pseudo-mask rule (docs/attention.md) as ``dense_pseudo_mask`` states it."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pmlm_engine.attention import dense_pseudo_mask
from pmlm_engine.config import MaskingConfig
from pmlm_engine.layout import collate_packed, collate_padded

from .helpers import SPECIAL, random_example


def visible_per_pair(wq: int, wk: int, dq: int, dk: int) -> bool:
    """The rule restated from the prose of docs/attention.md, by token kind, one pair at a time."""
    if dk < 0 or dq != dk:
        return False
    kind_k = "main" if wk == 0 else ("orig" if wk > 0 else "pseudo")
    if wq == 0:  # main sees main only
        return kind_k == "main"
    s = abs(wq)
    if wq > 0:  # an original sees main and originals of earlier or the same step
        return kind_k == "main" or (kind_k == "orig" and wk <= s)
    # a [P] sees main, originals of earlier steps and the [P]s of its own step
    return kind_k == "main" or (kind_k == "orig" and wk < s) or (kind_k == "pseudo" and -wk == s)


def test_paper_worked_example():
    """Fig. 2 of the paper, x1..x6 with spans {4,5} then {2}: the mask equals the table in docs/attention.md."""
    # main x1..x6, then x4 x5 (+1), [P]4 [P]5 (-1), x2 (+2), [P]2 (-2)
    step = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, -1, -1, 2, -2])
    names = ["x1", "M2", "x3", "M4", "M5", "x6", "x4", "x5", "P4", "P5", "x2", "P2"]
    main = set(names[:6])
    expected = {
        **{n: main for n in names[:6]},
        "x4": main | {"x4", "x5"},
        "x5": main | {"x4", "x5"},
        "P4": main | {"P4", "P5"},
        "P5": main | {"P4", "P5"},
        "x2": main | {"x4", "x5", "x2"},
        "P2": main | {"x4", "x5", "P2"},
    }
    mask = dense_pseudo_mask(step)
    for i, q in enumerate(names):
        got = {names[j] for j in range(len(names)) if mask[i, j]}
        assert got == expected[q], f"query {q}: attends {sorted(got)}, expected {sorted(expected[q])}"


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    seed=st.integers(0, 2**32),
    packed=st.booleans(),
    ratio=st.sampled_from([0.15, 0.4]),
)
def test_random_layouts_agree_with_per_pair_rule(lengths, seed, packed, ratio):
    """On random layouts (padding or packing), every (query, key) entry equals the per-pair rule."""
    rng = np.random.default_rng(seed)
    cfg = MaskingConfig(mask_ratio=ratio)
    examples = [random_example(rng, n, seed + i, cfg) for i, n in enumerate(lengths)]
    if packed:
        batch = collate_packed(examples, SPECIAL.pad, row_len=max(len(e) for e in examples) + 17)
    else:
        batch = collate_padded(examples, SPECIAL.pad, pad_to_multiple=8)
    step, doc = batch["step"], batch["doc_ids"]
    mask = dense_pseudo_mask(step, doc)
    for b in range(step.shape[0]):
        w, d = step[b].tolist(), doc[b].tolist()
        expected = [[visible_per_pair(w[i], w[j], d[i], d[j]) for j in range(len(w))] for i in range(len(w))]
        assert mask[b].tolist() == expected


def test_padding_rows_and_keys():
    """Padding keys are never visible; padding queries see nothing; real tokens always see themselves."""
    rng = np.random.default_rng(0)
    batch = collate_padded([random_example(rng, 9, 1), random_example(rng, 30, 2)], SPECIAL.pad)
    mask = dense_pseudo_mask(batch["step"], batch["doc_ids"])
    pad = batch["doc_ids"] < 0
    assert pad.any()
    assert not mask.transpose(1, 2)[pad].any()
    assert not mask[pad].any()
    assert mask.diagonal(dim1=1, dim2=2)[~pad].all()


def test_decoding_queries_subset():
    """With q_step/q_doc_ids, the mask of a query subset equals the matching rows of the full mask."""
    rng = np.random.default_rng(3)
    batch = collate_padded([random_example(rng, 25, 4)], SPECIAL.pad)
    step, doc = batch["step"], batch["doc_ids"]
    full = dense_pseudo_mask(step, doc)
    rows = torch.tensor([0, 5, step.shape[1] - 1])
    sub = dense_pseudo_mask(step, doc, q_step=step[:, rows], q_doc_ids=doc[:, rows])
    assert torch.equal(sub, full[:, rows])
