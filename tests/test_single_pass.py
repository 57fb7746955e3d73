"""One PMLM pass equals its definition: the reuse of main encodings and the naive multi-pass losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pmlm_engine.config import MaskingConfig
from pmlm_engine.data import chunk_document
from pmlm_engine.layout import collate_packed, collate_padded
from pmlm_engine.losses import example_index_padded, per_example_losses, pmlm_loss
from pmlm_engine.masking import corrupt, sample_spans, shuffle_spans
from pmlm_engine.rng import SplitMix64

from .helpers import SPECIAL, explicit_mask, random_example, tiny_model


def _encode(model, ids, pos, seg, step=None):
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long).unsqueeze(0)  # noqa: E731
    step = np.zeros(len(ids), dtype=np.int64) if step is None else step
    return model(t(ids), t(pos), t(seg), t(step))[0]


def _naive_losses(model, tokens, segments, maskable, seed, cfg):
    """AE from a plain MLM pass; PAR from one forward per factorization step, built from Algorithm 1."""
    rng = SplitMix64(seed)
    spans = sample_spans(maskable, rng, cfg)
    order = shuffle_spans(spans, rng)
    main_ids = corrupt(tokens, spans, rng, cfg, SPECIAL.mask, (SPECIAL.random_lo, SPECIAL.random_hi))
    m = len(tokens)
    pos_main = np.arange(m)

    # AE: a plain masked-LM pass over the main part alone
    with explicit_mask(model, torch.ones(1, m, m, dtype=torch.bool)):
        h = _encode(model, main_ids, pos_main, segments)
    masked = sorted(p for s, e in spans for p in range(s, e))
    ae = F.cross_entropy(model.lm_head(h[masked]), torch.as_tensor(tokens[masked]), reduction="none")

    # PAR: step s sees the context and the spans of steps < s
    par = []
    for s in range(1, len(order) + 1):
        earlier = [p for (a, b) in order[:s - 1] for p in range(a, b)]
        earlier_step = [t for t, (a, b) in enumerate(order[:s - 1], 1) for _ in range(a, b)]
        current = list(range(*order[s - 1]))
        ids = np.concatenate([main_ids, tokens[earlier], np.full(len(current), SPECIAL.p)])
        pos = np.concatenate([pos_main, earlier, current]).astype(np.int64)
        n = len(ids)
        mask = torch.zeros(1, n, n, dtype=torch.bool)
        mask[0, :, :m] = True  # everyone sees the context
        for i, t_i in enumerate(earlier_step):  # an earlier original sees originals up to its own step
            for j, t_j in enumerate(earlier_step):
                mask[0, m + i, m + j] = t_j <= t_i
        mask[0, m + len(earlier):, m:] = True  # the [P]s of step s see everything in this pass
        with explicit_mask(model, mask):
            h = _encode(model, ids, pos, segments[pos])
        logits = model.lm_head(h[m + len(earlier):])
        par.append(F.cross_entropy(logits, torch.as_tensor(tokens[current]), reduction="none"))
    return ae, torch.cat(par) if par else torch.zeros(0, dtype=torch.float64)


@pytest.mark.parametrize("text_len,seed,ratio", [(20, 1, 0.15), (37, 7, 0.3), (61, 11, 0.15), (8, 3, 0.5)])
def test_single_pass_equals_naive_multipass(text_len, seed, ratio):
    """Single-pass AE and PAR per-token losses equal the naive multi-pass ones to 1e-10 (float64)."""
    cfg = MaskingConfig(mask_ratio=ratio)
    rng = np.random.default_rng(seed)
    ids = rng.integers(SPECIAL.random_lo, SPECIAL.random_hi, text_len)
    (seq,) = list(chunk_document(ids, text_len + 3, SPECIAL, seed))
    model = tiny_model()
    ex = random_example(np.random.default_rng(seed), text_len, seed, cfg)
    batch = collate_padded([ex], SPECIAL.pad)
    with torch.no_grad():
        h = model(batch["input_ids"], batch["position_ids"], batch["segment_ids"], batch["step"], batch["doc_ids"])
        out = pmlm_loss(h, batch["labels"], batch["step"], model.lm_head)
        ae, par = _naive_losses(model, seq.tokens, seq.segment_ids, seq.maskable, seed, cfg)
    kind = batch["step"][out.token_index[:, 0], out.token_index[:, 1]]
    assert len(par) > 0 and len(ae) == len(par)
    torch.testing.assert_close(out.token_loss[kind == 0], ae, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.token_loss[kind < 0], par, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.ae_loss, ae.mean(), rtol=1e-10, atol=0)
    torch.testing.assert_close(out.par_loss, par.mean(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("backend,dtype,tol", [("reference", torch.float64, 1e-12), ("auto", torch.float32, 2e-5)])
def test_main_encodings_equal_plain_mlm_pass(backend, dtype, tol):
    """Main-token encodings of the PMLM pass equal a plain MLM pass over the main part alone."""
    rng = np.random.default_rng(5)
    examples = [random_example(rng, n, 10 + n) for n in (30, 45)]
    model = tiny_model(dtype, backend=backend)
    batch = collate_padded(examples, SPECIAL.pad)
    with torch.no_grad():
        h = model(batch["input_ids"], batch["position_ids"], batch["segment_ids"], batch["step"], batch["doc_ids"])
        for r, ex in enumerate(examples):
            m = ex.num_main
            plain = _encode(model, ex.input_ids[:m], ex.position_ids[:m], ex.segment_ids[:m])
            torch.testing.assert_close(h[r, :m], plain, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,dtype,tol", [("reference", torch.float64, 1e-10), ("auto", torch.float32, 1e-4)])
def test_padded_and_packed_give_same_per_example_losses(backend, dtype, tol):
    """The same examples padded one per row or packed several per row give the same per-example losses."""
    rng = np.random.default_rng(9)
    examples = [random_example(rng, n, 100 + i, MaskingConfig(mask_ratio=0.3)) for i, n in enumerate([12, 40, 7, 25, 33])]
    model = tiny_model(dtype, backend=backend)
    results = []
    for batch in (collate_padded(examples, SPECIAL.pad), collate_packed(examples, SPECIAL.pad, row_len=80)):
        with torch.no_grad():
            h = model(batch["input_ids"], batch["position_ids"], batch["segment_ids"], batch["step"], batch["doc_ids"])
            out = pmlm_loss(h, batch["labels"], batch["step"], model.lm_head)
        index = batch.get("example_index", example_index_padded(batch["doc_ids"]))
        results.append(per_example_losses(out, batch["step"], index))
    padded, packed = results
    assert collate_packed(examples, SPECIAL.pad, row_len=80)["input_ids"].shape[0] < len(examples)
    assert padded.keys() == packed.keys() == set(range(len(examples)))
    for e in padded:
        np.testing.assert_allclose(packed[e], padded[e], rtol=tol, atol=0)
