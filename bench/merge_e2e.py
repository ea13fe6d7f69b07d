"""Merges bench/e2e.py runs (one per model) into one results set: every row tagged with its run's model, the
environment of each run kept, a markdown table and a plot of the measured speedup over model.generate beside
the ideal one (the same run's measured parts with no other overhead) where a row has it.

    python bench/merge_e2e.py RUN1.json RUN2.json ... --json OUT.json --md OUT.md --plot OUT.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown  # noqa: E402

COLUMNS = ("model", "batch", "config", "speedup_vs_generate", "ideal_speedup", "mean_accepted", "identical", "compiled",
           "tokens_per_s", "seconds")


def merge(paths):
    """(environments, rows): each run's environment, and its rows with ``model`` from it."""
    environments, rows = [], []
    for path in paths:
        run = json.loads(Path(path).read_text())
        environment = run["environment"]
        environments.append(dict(environment, source=Path(path).name))
        for row in run["rows"]:
            rows.append(dict(row, model=environment.get("model", Path(path).stem),
                             model_short=environment.get("model_short") or environment.get("model", "")[:40]))
    return environments, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    present = [path for path in args.runs if path.is_file()]
    missing = [str(path) for path in args.runs if not path.is_file()]
    if missing:
        print(f"merge_e2e: no results for {', '.join(missing)} (their runs failed or were skipped)", file=sys.stderr)
    if not present:
        return 1
    environments, rows = merge(present)
    args.json.write_text(json.dumps(dict(environment=environments[0], environments=environments, rows=rows), indent=1))
    if args.md:
        shown = [{key: (f"{row[key]:.3f}" if isinstance(row.get(key), float) else row.get(key, ""))
                  for key in COLUMNS} for row in rows]
        first = environments[0]
        args.md.write_text(markdown(shown, f"# end to end on {first['device']}, {first['date']}\n\ntorch "
                                           f"{first['torch']}; every decoder row checked token-identical to "
                                           f"model.generate; ideal: the same run's measured parts, no other overhead"))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        decoder_rows = [row for row in rows if row["config"] != "generate"]
        labels = [f"{row['model_short']}\n{row['config']} (B={row['batch']})" for row in decoder_rows]
        figure, axis = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.5))
        positions = range(len(labels))
        axis.barh([p + 0.2 for p in positions], [row["speedup_vs_generate"] for row in decoder_rows], 0.4,
                  label="measured")
        axis.barh([p - 0.2 for p in positions], [row.get("ideal_speedup") or 0 for row in decoder_rows], 0.4,
                  label="ideal (measured parts)")
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_yticks(list(positions), labels, fontsize=6)
        axis.set_xlabel("speedup over model.generate")
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
    print(f"merge_e2e: {len(rows)} rows from {len(present)} runs -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
