"""Tables of results read from artifacts' metrics.json (`python -m adapt.report zeroshot RUN…`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def zeroshot_table(runs: list[Path]) -> str:
    """Markdown table: target domain, top-1 accuracy, number of target images."""
    rows = ["| target | zero-shot top-1 | images |", "|---|---:|---:|"]
    accs = []
    for run in runs:
        m = json.loads((Path(run) / "metrics.json").read_text())
        acc = m["target_accuracy"]
        accs.append(acc)
        shown = "n/a" if acc is None else f"{100 * acc:.1f} %"
        rows.append(f"| {m['target']} | {shown} | {m['n_target']} |")
    known = [a for a in accs if a is not None]
    if known:
        rows.append(f"| **average** | {100 * sum(known) / len(known):.1f} % | |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "zeroshot":
        print("usage: python -m adapt.report zeroshot RUN [RUN ...]", file=sys.stderr)
        return 2
    print(zeroshot_table([Path(a) for a in argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
