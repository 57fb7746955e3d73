"""The closing summary of ``scripts/demo.sh``: what each step printed about its loss, the timings, the scores.

    python scripts/demo_summary.py runs/demo --threads 1 --load 0.3 --seconds 1100

The loss lines are quoted from the steps' own console output (``$OUT/logs/*.log``), not
recomputed, so the summary, the console and the README's figures are the same numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

LOSS_LINE = re.compile(r"loss \d+\.\d+ -> \d+\.\d+[^\n]*")


def loss_line(log: Path) -> str:
    """The last ``loss A -> B ...`` line a step printed (its own first/last-window summary)."""
    if not log.is_file():
        return f"(no log {log})"
    found = LOSS_LINE.findall(log.read_text(encoding="utf-8", errors="replace"))
    return found[-1].strip() if found else f"(no loss line in {log})"


def summary(out: Path, threads: str, load: str, seconds: int) -> str:
    """The summary text of the demo run in ``out``."""
    steps = {}
    times = out / "logs" / "seconds.txt"
    if times.is_file():
        for line in times.read_text().split("\n"):
            if line.strip():
                name, secs = line.split()
                steps[name] = int(secs)
    lines = [(f"[demo] summary: {seconds} s end to end after set-up, {threads} thread(s), 1-minute load {load} at the "
             f"start; outputs in {out}")]
    for name in ("pretrain", "finetune"):
        lines.append(f"  {name:9s} {steps.get(name, '?')!s:>5} s  {loss_line(out / 'logs' / f'{name}.log')}")
    scores_file = out / "scores.json"
    if not scores_file.is_file():
        lines.append(f"  no scores ({scores_file} missing)")
        return "\n".join(lines)
    result = json.loads(scores_file.read_text())
    rows = result["scores"]
    model = rows[0]
    lines.append(f"  decode    {steps.get('decode', '?')!s:>5} s  {model['examples']} predictions, "
                 f"{model['empty_predictions']} empty")
    boot = result.get("bootstrap")
    for r in rows:
        cells = []
        for k in ("rouge1", "rouge2", "rougeL"):
            ci = boot["intervals"][r["system"]][k] if boot else None
            cells.append(f"{r[k]:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        lines.append(f"  {r['system']:18s} ROUGE-1/2/L {' / '.join(cells)}  BLEU-4 {r['bleu4']:.2f}")
    for name, d in (boot or {}).get("differences", {}).items():
        cells = [f"[{d[k][0]:+.2f}, {d[k][1]:+.2f}]" for k in ("rouge1", "rouge2", "rougeL")]
        lines.append(f"  {name:18s} difference, 95% interval: {' / '.join(cells)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the demo's output folder")
    p.add_argument("--threads", default="?", help="threads the steps ran with")
    p.add_argument("--load", default="?", help="1-minute load average at the start")
    p.add_argument("--seconds", type=int, default=0, help="wall time of the steps")
    a = p.parse_args(argv)
    print(summary(Path(a.out), a.threads, a.load, a.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
