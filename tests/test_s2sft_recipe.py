"""The ``s2s-ft`` fine-tuning recipe: corruption frequencies, KL label smoothing, loss normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pmlm_engine.layout import build_seq2seq_example, collate_padded
from pmlm_engine.losses import LabelSmoothing, pmlm_loss, s2sft_smoothed_loss

from .helpers import SPECIAL, VOCAB, tiny_model


def _corrupted(recipe: str, n_examples: int = 300, target_mask_prob: float = 0.5):
    """(labels, [P] inputs, teacher copies) of every target position of ``n_examples`` random targets."""
    rng = np.random.default_rng(0)
    labels, pseudo, teacher = [], [], []
    for i in range(n_examples):
        tgt = rng.integers(SPECIAL.random_lo, VOCAB, 20).tolist()
        ex = build_seq2seq_example([10, 11, 12], tgt, SPECIAL, target_mask_prob, seed=1000 + i, recipe=recipe)
        labels += ex.labels[ex.step < 0].tolist()
        pseudo += ex.input_ids[ex.step < 0].tolist()
        teacher += ex.input_ids[ex.step > 0].tolist()
    return np.array(labels), np.array(pseudo), np.array(teacher)


def test_s2sft_corruption_frequencies():
    """6,000 target positions, s2s-ft defaults (keep 0.1, random 0.1, target_mask_prob 0.5): [P] inputs are
    ~80% pseudo token / ~10% label / ~10% other; teacher copies ~40% [MASK] / ~5% other / ~55% label.
    Tolerance: 4 binomial standard deviations at n = 6,000 (<= 0.026)."""
    labels, pseudo, teacher = _corrupted("s2s-ft")
    n = len(labels)
    assert n == 6000

    def close(observed: float, p: float) -> None:
        assert abs(observed - p) <= 4 * np.sqrt(p * (1 - p) / n), (observed, p)

    p_mask = np.mean(pseudo == SPECIAL.p)
    p_label = np.mean(pseudo == labels)
    p_other = np.mean((pseudo != SPECIAL.p) & (pseudo != labels))
    # a random draw hits the label or the pseudo id with probability 1/V each
    close(p_mask, 0.8 + 0.1 / VOCAB)
    close(p_label, 0.1 + 0.1 / VOCAB)
    close(p_other, 0.1 * (1 - 2 / VOCAB))
    t_mask = np.mean(teacher == SPECIAL.mask)
    t_other = np.mean((teacher != SPECIAL.mask) & (teacher != labels))
    close(t_mask, 0.5 * 0.8)
    close(t_other, 0.5 * 0.1 * (1 - 2 / VOCAB))
    # the teacher copy, where corrupted, is the same draw as the [P] input (s2s-ft reuses it)
    corrupted_other = (teacher != labels) & (teacher != SPECIAL.mask)
    assert np.array_equal(teacher[corrupted_other], pseudo[corrupted_other])
    masked_inputs = pseudo[teacher == SPECIAL.mask]  # the pseudo token, or a random draw that was [MASK]
    assert np.all((masked_inputs == SPECIAL.p) | (masked_inputs == SPECIAL.mask))
    # random draws cover the whole vocabulary, special ids included, as s2s-ft's randint(0, V - 1)
    assert pseudo[(pseudo != SPECIAL.p) & (pseudo != labels)].min() < SPECIAL.random_lo


def test_pmlm_recipe_is_unchanged():
    """The default recipe: every [P] input is the pseudo token, copies are the label or [MASK] (~50%)."""
    labels, pseudo, teacher = _corrupted("pmlm")
    assert np.all(pseudo == SPECIAL.p)
    assert np.all((teacher == labels) | (teacher == SPECIAL.mask))
    assert abs(np.mean(teacher == SPECIAL.mask) - 0.5) < 0.03
    with pytest.raises(ValueError, match="recipe"):
        build_seq2seq_example([5], [6], SPECIAL, recipe="unilm")


def _s2sft_kl_reference(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """s2s-ft's LabelSmoothingLoss, restated: a (N, V) target row eps/(V-2), 0 at id 0, 1-eps at the label,
    rows with label 0 zeroed; F.kl_div(log p, q) summed over the vocabulary."""
    v = logits.shape[-1]
    q = torch.full((len(labels), v), eps / (v - 2), dtype=logits.dtype)
    q[:, 0] = 0
    q.scatter_(1, labels.unsqueeze(1), 1 - eps)
    q[labels == 0] = 0
    return F.kl_div(F.log_softmax(logits, -1), q, reduction="none").sum(-1)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_s2sft_smoothed_loss_equals_kl_reference(eps: float):
    """Closed form = explicit KL(q || p), values and gradients, float64, on fresh random logits with a
    padding-label row; and it is not torch's label smoothing (whose gradient differs)."""
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(9, VOCAB, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(1, VOCAB, (9,), generator=g)
    labels[4] = 0  # a padding label contributes nothing
    ours = s2sft_smoothed_loss(logits, labels, eps)
    ref = _s2sft_kl_reference(logits, labels, eps)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert ours[4] == 0
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    keep = labels != 0
    torch_ls = F.cross_entropy(logits[keep], labels[keep], label_smoothing=eps, reduction="sum")
    (g_torch,) = torch.autograd.grad(torch_ls, logits)
    assert (g_torch[keep] - g_ref[keep]).abs().max() > 1e-4


def test_pmlm_loss_with_s2sft_smoothing_and_normalisation():
    """pmlm_loss with LabelSmoothing('s2s-ft') on a tiny model's seq2seq batch: PAR sum / (targets + 1e-5) equals
    s2s-ft's loss_mask_and_normalize over the reference KL of the [P] logits."""
    model = tiny_model(torch.float64)
    exs = [build_seq2seq_example([10, 11, 12, 13], [20, 21, SPECIAL.sep], SPECIAL, 0.5, seed=1, recipe="s2s-ft"),
           build_seq2seq_example([14, 15], [22, 23, 24, 25, SPECIAL.sep], SPECIAL, 0.5, seed=2, recipe="s2s-ft")]
    b = collate_padded(exs, SPECIAL.pad)
    with torch.no_grad():
        hidden = model(b["input_ids"], b["position_ids"], b["segment_ids"], b["step"], b["doc_ids"])
        out = pmlm_loss(hidden, b["labels"], b["step"], model.lm_head, ae_weight=0.0,
                        label_smoothing=LabelSmoothing(0.1, "s2s-ft"))
        rows, cols = (b["labels"] != -100).nonzero(as_tuple=True)
        ref_tok = _s2sft_kl_reference(model.lm_head(hidden[rows, cols]), b["labels"][rows, cols], 0.1)
    n = len(rows)
    assert out.par_tokens == n == 8
    torch.testing.assert_close(out.token_loss, ref_tok, rtol=1e-12, atol=1e-12)
    s2sft_loss = (ref_tok / (n + 1e-5)).sum()
    torch.testing.assert_close(out.token_loss.sum() / (n + 1e-5), s2sft_loss, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="kind"):
        LabelSmoothing(0.1, "fairseq")


def test_finetune_with_s2sft_recipe_then_export_to_s2sft(tmp_path):
    """A 3-step run with --recipe s2s-ft (CLI) trains on finite losses; its model folder is self-contained and
    exports to s2s-ft's layout with the run's label smoothing recorded."""
    import json

    from pmlm_engine.checkpoint import save_model
    from pmlm_engine.config import ModelConfig
    from pmlm_engine.convert import main as convert_main
    from pmlm_engine.corpus import minilm_dir
    from pmlm_engine.finetune import main as finetune_main
    from pmlm_engine.model import PMLMModel

    torch.manual_seed(0)
    init = save_model(PMLMModel(ModelConfig(vocab_size=30522, hidden_size=16, num_layers=1, num_heads=2,
                                            intermediate_size=32, max_position=64)),
                      tmp_path / "init", extra={"tokenizer": str(minilm_dir() / "vocab.txt")})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"src": f"the council met on day {i} to vote", "tgt": f"vote {i}"}) + "\n"
                            for i in range(4)))
    out = tmp_path / "ft"
    assert finetune_main(["--init", str(init), "--data", str(data), "--out", str(out), "--steps", "3",
                          "--batch-size", "2", "--warmup", "1", "--max-src-len", "16", "--max-tgt-len", "8",
                          "--recipe", "s2s-ft", "--log-every", "1", "--threads", "1"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["finetune"]["recipe"] == "s2s-ft" and cfg["tokenizer"] == "vocab.txt"
    assert convert_main(["export-s2s-ft", str(out / "final"), str(tmp_path / "s2s")]) == 0
    s2s_cfg = json.loads((tmp_path / "s2s" / "config.json").read_text())
    assert s2s_cfg["label_smoothing"] == 0.1 and (tmp_path / "s2s" / "vocab.txt").is_file()
