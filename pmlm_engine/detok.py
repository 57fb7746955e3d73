"""Readable text from generated token ids: WordPiece joining, punctuation spacing, the source's surface form.

A WordPiece model generates lowercase pieces; joined with spaces they read "c + + library",
"python - openid", "( development files )". :func:`detokenize` turns ids into text in three
layers (docs/decoding.md has the long version):

1. **Words** -- a piece and the ``##`` pieces after it form one word, joined by the tokenizer's
   own decoder (``tokenizers``' WordPiece decoder); special tokens are dropped (``[UNK]`` kept).
2. **Spacing** -- words are joined by one space, except: none before closing punctuation
   (``. , ; : ! ? ) ] } %`` and ``'s``-style clitics), none after opening punctuation
   (``( [ { $ #``), none on either side of intra-word joiners (``- / ' _ @ ~ ^ \\ |``), none
   before ``+`` ("c++"), and none around ``.`` ``,`` ``:`` between two digits ("3.5",
   "1,000", "10:30") or ``.`` between single letters ("u.s."); quote marks alternate between
   opening and closing (:func:`_quote_roles`).
3. **Surface restoration** (``source`` given, tokenizers with character offsets): the generated
   ids are covered left to right by the longest runs that also occur, token for token, in the
   tokenized source; each run is replaced by the source's own characters between its first and
   last token ("C++", "python-openid", "(development files)", "DeVos"). Among several
   occurrences of the longest run, the most frequent surface form wins (first occurrence on a
   tie), so a sentence-initial "The" does not capitalise every "the". Runs of one punctuation
   token keep the rules of layer 2 for their spacing. Tokens not found in the source keep
   layers 1-2.

A sentencepiece tokenizer encodes spaces itself: its decoder's text is returned as it is
(layer 1 only; no restoration, since the wrapper exposes no character offsets).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional, Sequence

CLOSERS = frozenset(". , ; : ! ? ) ] } % ...".split()) | {"'s", "'m", "'re", "'ve", "'d", "'ll", "n't"}
OPENERS = frozenset("( [ { $ #".split())
JOINERS = frozenset("- / ' _ @ ~ ^ \\ |".split())
CLITICS = frozenset("s t m d re ve ll".split())
LEFT_GLUE = frozenset("+")
"""Glued to the word before ("c++", "3+"), spaced from the word after unless that is one too."""


def _words(tokenizer: Any, ids: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, end)`` index ranges of words: a piece plus the ``##`` pieces that follow it."""
    spans: list[tuple[int, int]] = []
    for i, t in enumerate(ids):
        if spans and tokenizer.id_to_token(t).startswith("##"):
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def _tight(left: str, mid: str, right: str) -> bool:
    """``mid`` sits inside a number ("3.5", "1,000", "10:30") or an abbreviation ("u.s")."""
    if mid in (".", ",", ":") and left[-1:].isdigit() and right[:1].isdigit():
        return True
    return mid == "." and len(left) == 1 and left.isalpha() and len(right) == 1 and right.isalpha()


def _space_between(left: str, right: str, left_role: str = "", right_role: str = "") -> bool:
    """Whether a space separates two adjacent words (layer 2 of the module docstring); ``*_role`` is
    ``"open"`` / ``"close"`` for quote marks (see :func:`_quote_roles`)."""
    if right_role == "close" or left_role == "open":
        return False
    if right in CLOSERS or right in LEFT_GLUE or (right in JOINERS and not right_role):
        return False
    if right_role == "open" or left_role == "close":
        return True
    return left not in OPENERS and left not in JOINERS


def _quote_roles(words: Sequence[str]) -> list[str]:
    """``"open"`` / ``"close"`` / ``""`` per word: ``"`` marks alternate open, close; so do ``'``
    marks when the text holds an even number (>= 2) of them; a lone ``'`` after a word ending in
    ``s`` closes a plural possessive ("residents' feedback"); otherwise ``'`` joins ("o'brien"),
    as it always does before a clitic ("museum's", "won't")."""
    roles = [""] * len(words)
    for mark in ('"', "'"):
        at = [k for k, w in enumerate(words)
              if w == mark and not (mark == "'" and k + 1 < len(words) and words[k + 1] in CLITICS)]
        if mark == '"' or (len(at) >= 2 and len(at) % 2 == 0):
            for n, k in enumerate(at):
                roles[k] = "open" if n % 2 == 0 else "close"
        elif len(at) == 1 and at[0] > 0 and words[at[0] - 1].endswith("s"):
            roles[at[0]] = "close"
    return roles


def join_words(words: Sequence[str]) -> str:
    """Layer 2: join words with spaces except around punctuation (see the module docstring)."""
    roles = _quote_roles(words)
    out = ""
    for k, w in enumerate(words):
        if k == 0:
            out = w
            continue
        prev = words[k - 1]
        after_tight = k >= 2 and _tight(words[k - 2], prev, w)
        space = not after_tight and _space_between(prev, w, roles[k - 1], roles[k])
        out += " " + w if space else w
    return out


def _surface_runs(pred: Sequence[int], src: Sequence[int]) -> list[tuple[int, int, list[int]]]:
    """Cover ``pred`` left to right by ``(start, end, src_starts)``: the longest run of ``pred`` from
    ``start`` that occurs in ``src``, with every ``src`` index where it occurs (``[]`` and length 1
    where ``pred[start]`` is not in ``src``)."""
    positions: dict[int, list[int]] = {}
    for j, t in enumerate(src):
        positions.setdefault(t, []).append(j)
    runs: list[tuple[int, int, list[int]]] = []
    i = 0
    while i < len(pred):
        best_len, starts = 1, []
        for j in positions.get(pred[i], []):
            n = 1
            while i + n < len(pred) and j + n < len(src) and pred[i + n] == src[j + n]:
                n += 1
            if n > best_len or not starts:
                best_len, starts = n, [j]
            elif n == best_len:
                starts.append(j)
        runs.append((i, i + best_len, starts))
        i += best_len
    return runs


def detokenize(tokenizer: Any, ids: Sequence[int], source: Optional[str] = None) -> str:
    """Readable text of generated ``ids`` (see the module docstring).

    Args:
        tokenizer: a :class:`pmlm_engine.tokenizer.Tokenizer`.
        ids: generated token ids (no final ``[SEP]`` needed; special tokens are dropped).
        source: the source text the ids were generated from, for surface restoration.
    """
    skip = tokenizer.skipped_ids()
    ids = [int(i) for i in ids if int(i) not in skip]
    if not hasattr(tokenizer, "encode_with_offsets"):
        return tokenizer.decode(ids)  # sentencepiece: its decoder places the spaces
    spans = _words(tokenizer, ids)
    if source is None:
        return join_words([tokenizer.decode(ids[a:b]) for a, b in spans])
    src_ids, offsets = tokenizer.encode_with_offsets(source)
    word_of = [w for w, (a, b) in enumerate(spans) for _ in range(a, b)]  # token index -> word index
    words: list[str] = []
    for start, end, starts in _surface_runs(ids, src_ids):
        if starts:
            forms = [" ".join(source[offsets[j][0]:offsets[j + end - start - 1][1]].split()) for j in starts]
            counts = Counter(forms)
            text = max(forms, key=lambda f: counts[f])  # the most frequent form; the first one on a tie
        else:
            text = tokenizer.decode([ids[start]])
        if words and word_of[start] == word_of[start - 1]:  # continues the word the previous run ended in
            words[-1] += text.removeprefix("##")
        else:
            words.append(text)
    return join_words(words)
