"""The PMLM layout of one example and the two ways to batch examples (docs/layout.md).

This module owns the layout: the main part, then for each factorization step ``s``
the ORIGINAL tokens of span ``s`` (``step = +s``) followed by one ``[P]`` per token
(``step = -s``), each appended token at the position id of the token it stands for.
Pre-training (:func:`build_example`) and sequence-to-sequence fine-tuning
(:func:`build_seq2seq_example`, docs/finetuning.md) are the same layout.

Per-token fields (all ``int64``):

* ``input_ids``: token ids (main part corrupted 80/10/10; ORIGINAL tokens uncorrupted;
  PSEUDO tokens are ``[P]``);
* ``position_ids``, ``segment_ids``;
* ``step``: 0 main, ``+s`` ORIGINAL of step ``s``, ``-s`` PSEUDO of step ``s``;
* ``labels``: the original token where a loss applies, else :data:`IGNORE`. Where
  ``step == 0`` it is an AE label, where ``step < 0`` a PAR label;
* ``doc_ids`` (added by batching): which example of the row a token belongs to,
  ``-1`` for padding.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .config import MaskingConfig
from .example import FIELDS, IGNORE, Example, SpecialIds
from .masking import corrupt, sample_spans, shuffle_spans
from .rng import SplitMix64

__all__ = ["FIELDS", "IGNORE", "Example", "SpecialIds", "build_example", "build_example_python",
           "build_seq2seq_example", "collate_packed", "collate_padded", "pack_rows"]


def _append_steps(
    main_ids: np.ndarray,
    original: np.ndarray,
    segment_ids: np.ndarray,
    order: Sequence[tuple[int, int]],
    pseudo_id: int,
    main_labels: np.ndarray,
) -> Example:
    """Main part plus, per step, the ORIGINAL span then its ``[P]`` tokens."""
    m = len(main_ids)
    parts_ids, parts_pos, parts_step, parts_lab = [main_ids], [np.arange(m)], [np.zeros(m, np.int64)], [main_labels]
    for s, (start, end) in enumerate(order, start=1):
        pos = np.arange(start, end)
        k = end - start
        parts_ids += [original[start:end], np.full(k, pseudo_id)]
        parts_pos += [pos, pos]
        parts_step += [np.full(k, s), np.full(k, -s)]
        parts_lab += [np.full(k, IGNORE), original[start:end]]
    position_ids = np.concatenate(parts_pos).astype(np.int64)
    return Example(
        input_ids=np.concatenate(parts_ids).astype(np.int64),
        position_ids=position_ids,
        segment_ids=segment_ids[position_ids].astype(np.int64),
        step=np.concatenate(parts_step).astype(np.int64),
        labels=np.concatenate(parts_lab).astype(np.int64),
        num_main=m,
    )


def build_example_python(
    tokens: np.ndarray,
    segment_ids: np.ndarray,
    maskable: np.ndarray,
    seed: int,
    cfg: MaskingConfig,
    special: SpecialIds,
) -> Example:
    """Reference implementation of :func:`build_example`."""
    rng = SplitMix64(seed)
    tokens = np.asarray(tokens, dtype=np.int64)
    spans = sample_spans(np.asarray(maskable, dtype=bool), rng, cfg)
    order = shuffle_spans(spans, rng)
    main_ids = corrupt(tokens, spans, rng, cfg, special.mask, (special.random_lo, special.random_hi))
    labels = np.full(len(tokens), IGNORE, dtype=np.int64)
    for start, end in spans:
        labels[start:end] = tokens[start:end]
    return _append_steps(main_ids, tokens, np.asarray(segment_ids, dtype=np.int64), order, special.p, labels)


def build_example(
    tokens: np.ndarray,
    segment_ids: np.ndarray,
    maskable: np.ndarray,
    seed: int,
    cfg: MaskingConfig,
    special: SpecialIds,
    backend: str = "auto",
) -> Example:
    """Mask one main sequence and lay it out for PMLM pre-training.

    Args:
        tokens: ``(M,)`` main-sequence ids, special tokens included (``[CLS] A [SEP] B [SEP]``).
        segment_ids: ``(M,)`` segment of each token.
        maskable: ``(M,)`` bool, False for special tokens.
        seed: seed of this example's random stream (see :func:`pmlm_engine.rng.derive_seed`).
        backend: ``"python"``, ``"cpp"`` (the ``pmlm_engine._C`` extension) or ``"auto"``.
    """
    if backend not in ("auto", "python", "cpp"):
        raise ValueError(f"layout backend={backend!r}: choose 'auto', 'python' or 'cpp'")
    if backend != "python":
        from . import _native

        if _native.available():
            return _native.build_example(tokens, segment_ids, maskable, seed, cfg, special)
        if backend == "cpp":
            raise RuntimeError(f"layout backend 'cpp' requested but {_native.why_unavailable()}")
    return build_example_python(tokens, segment_ids, maskable, seed, cfg, special)


def build_seq2seq_example(
    source: Sequence[int],
    target: Sequence[int],
    special: SpecialIds,
    target_mask_prob: float = 0.0,
    seed: int = 0,
    recipe: str = "pmlm",
    keep_prob: float = 0.1,
    random_prob: float = 0.1,
) -> Example:
    """Sequence-to-sequence layout (docs/finetuning.md).

    Main part ``[CLS] source [SEP]`` (segment 0); target ``t_1 .. t_T`` (``[SEP]``
    appended by the caller when it is the end-of-sequence token) becomes T one-token
    steps in left-to-right order at positions ``|main| + i - 1`` in segment 1. Labels sit on
    the PSEUDO tokens only. The corruption depends on ``recipe``:

    * ``"pmlm"``: every ``[P]`` input is the pseudo token; the ORIGINAL copy of ``t_i`` is
      replaced by ``[MASK]`` with probability ``target_mask_prob``.
    * ``"s2s-ft"`` (:func:`s2sft_corruption`): s2s-ft's fine-tuning corruption (its ``mask_way v2``).
    """
    main = np.asarray([special.cls, *source, special.sep], dtype=np.int64)
    tgt = np.asarray(target, dtype=np.int64)
    if len(tgt) == 0:
        raise ValueError("empty target: a sequence-to-sequence example needs at least one target token")
    m = len(main)
    rng = SplitMix64(seed)
    pseudo = None
    if recipe == "s2s-ft":
        teacher, pseudo = s2sft_corruption(tgt, special, target_mask_prob, keep_prob, random_prob, rng)
    elif recipe == "pmlm":
        teacher = tgt.copy()
        if target_mask_prob > 0:
            for i in range(len(tgt)):
                if rng.uniform() < target_mask_prob:
                    teacher[i] = special.mask
    else:
        raise ValueError(f"unknown fine-tuning recipe {recipe!r}: expected 'pmlm' or 's2s-ft'")
    original = np.concatenate([main, teacher])
    segments = np.concatenate([np.zeros(m, np.int64), np.ones(len(tgt), np.int64)])
    order = [(m + i, m + i + 1) for i in range(len(tgt))]
    ex = _append_steps(main, original, segments, order, special.p, np.full(m, IGNORE, np.int64))
    ex.labels[ex.step < 0] = tgt  # PAR labels are the true target, even where the copy is masked
    if pseudo is not None:
        ex.input_ids[ex.step < 0] = pseudo
    return ex


def s2sft_corruption(target: np.ndarray, special: SpecialIds, target_mask_prob: float, keep_prob: float,
                     random_prob: float, rng: SplitMix64) -> tuple[np.ndarray, np.ndarray]:
    """s2s-ft's fine-tuning corruption of one target: ``(teacher copies, [P] inputs)``.

    Per target token ``t``, as s2s-ft's ``mask_way v2`` does: one replacement ``r`` is drawn,
    ``t`` itself with probability ``keep_prob``, a uniformly random id of the whole vocabulary
    ``[0, random_hi)`` with probability ``random_prob``, else the pseudo token (``[MASK]`` unless
    the vocabulary has a separate ``[P]``). ``r`` is the ``[P]`` input; the teacher copy becomes
    ``r`` too with probability ``target_mask_prob`` (``[MASK]`` where ``r`` is the pseudo token).
    With s2s-ft's defaults (0.1, 0.1, 0.5): ``[P]`` inputs ~80% ``[MASK]``, ~10% the label, ~10%
    random; teacher copies ~40% ``[MASK]``, ~5% random, the rest the true token.
    """
    teacher = target.copy()
    pseudo = np.empty_like(target)
    for i, t in enumerate(target.tolist()):
        u = rng.uniform()
        if u < keep_prob:
            r, masked = t, False
        elif u < keep_prob + random_prob:
            r, masked = rng.randbelow(special.random_hi), False
        else:
            r, masked = special.p, True
        pseudo[i] = r
        if rng.uniform() < target_mask_prob:
            teacher[i] = special.mask if masked else r
    return teacher, pseudo


# ---------------------------------------------------------------------------------------------
# Batching


def collate_padded(examples: Sequence[Example], pad_id: int, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """One example per row, right-padded. Returns ``(B, L)`` tensors including ``doc_ids``
    (0 for tokens, -1 for padding)."""
    if not examples:
        raise ValueError("collate_padded needs at least one example")
    length = max(len(e) for e in examples)
    length = -(-length // pad_to_multiple) * pad_to_multiple
    batch = {f: torch.full((len(examples), length), IGNORE if f == "labels" else 0, dtype=torch.long)
             for f in FIELDS}
    batch["input_ids"].fill_(pad_id)
    batch["doc_ids"] = torch.full((len(examples), length), -1, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex)
        for f in FIELDS:
            batch[f][row, :n] = torch.from_numpy(getattr(ex, f))
        batch["doc_ids"][row, :n] = 0
    return batch


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """First-fit-decreasing assignment of examples to rows of ``row_len`` tokens."""
    too_long = [i for i, n in enumerate(lengths) if n > row_len]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than "
                         f"row_len={row_len}: raise row_len or lower the max_len of examples")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if free >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_len - lengths[i])
    return rows


def collate_packed(examples: Sequence[Example], pad_id: int, row_len: int) -> dict[str, torch.Tensor]:
    """Pack several examples per row; ``doc_ids`` numbers the examples of a row (0, 1, ...)
    and is -1 on padding. Also returns ``example_index`` ``(B, L)``: the index in
    ``examples`` of each token's example (-1 on padding)."""
    rows = pack_rows([len(e) for e in examples], row_len)
    parts = [[examples[i] for i in row] for row in rows]
    merged = []
    for row in parts:
        merged.append(Example(
            **{f: np.concatenate([getattr(e, f) for e in row]) for f in FIELDS}, num_main=-1))
    batch = collate_padded(merged, pad_id)
    batch["example_index"] = torch.full_like(batch["doc_ids"], -1)
    for r, row in enumerate(rows):
        offset = 0
        for d, i in enumerate(row):
            n = len(examples[i])
            batch["doc_ids"][r, offset:offset + n] = d
            batch["example_index"][r, offset:offset + n] = i
            offset += n
    return batch
