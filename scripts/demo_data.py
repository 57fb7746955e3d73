"""The demo's fine-tuning data: the built-in train split less a validation split carved from it.

    python scripts/demo_data.py news runs/demo/data     # writes news_train.jsonl and news_val.jsonl

The validation split is the 200 train pairs whose ``sha256("<corpus>:valid:<id>")`` hex digests are
smallest (the test split of :mod:`pmlm_engine.s2s_data` ranks ``"<corpus>:<id>"`` and is already
removed). Settings are chosen on it, never on the test split; the rest, in corpus order, is what
the demo fine-tunes on (3,295 news pairs).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

VAL_SIZE = 200


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", choices=["news", "wiki"], help="built-in pair corpus")
    p.add_argument("out", help="folder for <corpus>_train.jsonl and <corpus>_val.jsonl")
    a = p.parse_args(argv)
    from pmlm_engine.s2s_data import builtin_pairs, write_jsonl

    train = builtin_pairs(a.corpus, "train")
    ranked = sorted(train, key=lambda r: hashlib.sha256(f"{a.corpus}:valid:{r.id}".encode()).hexdigest())
    val = {r.id for r in ranked[:VAL_SIZE]}
    out = Path(a.out)
    for name, keep in (("train", False), ("val", True)):
        write_jsonl([{"id": r.id, "src": r.src, "tgt": r.tgt} for r in train if (r.id in val) == keep],
                    out / f"{a.corpus}_{name}.jsonl")
    print(f"{a.corpus}: {len(train) - len(val)} fine-tuning pairs in {out / f'{a.corpus}_train.jsonl'}, "
          f"{len(val)} validation pairs in {out / f'{a.corpus}_val.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
