"""Plot a GPU's kernel figures before and after a change: the Triton LM head's and verify_attention's % of
copy bandwidth and % of a same-size read, and kv_compact's time against a same-size copy.

    python bench/plot_tuning.py --before bench/results/NVIDIA-H200-2026-11-26 \
        --after bench/results/NVIDIA-H200-2026-11-26-tuned --tune bench/results/NVIDIA-H200-2026-11-26-tune.json \
        --out bench/results/NVIDIA-H200-2026-11-26-tuning.png

--before / --after are result prefixes (PREFIX-lm_head.json, PREFIX-verify_attention.json, PREFIX-kv_cache.json,
as bench/gpu_check.sh writes them). kv_compact's "after" comes from --tune (bench/tune_gpu.py's rows for
the launcher's settings) when given: its timings were steadier than one benchmark pass.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(prefix: str, op: str):
    path = Path(f"{prefix}-{op}.json")
    return json.loads(path.read_text())["rows"] if path.exists() else []


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("--tune", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))

    def before_after(ax, op, series, x, y, goal, xlabel, title):
        """One line per (series, before/after): dashed before, solid after, one colour per series."""
        for label, rows, style in (("before", load(args.before, op), "o--"), ("after", load(args.after, op), "s-")):
            for color, (name, keep) in zip(("C0", "C1", "C2", "C3"), series):
                picked = [r for r in rows if keep(r)]
                if picked:
                    ax.plot([r[x] for r in picked], [r[y] for r in picked], style, color=color,
                            label=f"{name} {label}")
        ax.axhline(goal, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("% of copy bandwidth")
        ax.set_title(title)
        ax.legend(fontsize=7)

    before_after(axes[0], "lm_head",
                 [(head, lambda r, head=head: r["dtype"] == "bf16" and r["head"] == head)
                  for head in ("32064x4096", "151936x3584")],
                 "M", "triton_argmax_pct_copy", 85, "rows M", "early_exit_head argmax (Triton, bf16)")
    before_after(axes[1], "verify_attention",
                 [(f"{shape} B={batch}", lambda r, shape=shape, batch=batch: r["shape"] == shape and r["B"] == batch
                   and r["T"] == 4 and r["mask"] == "chain")
                  for shape in ("llava-1.5-7b", "qwen2-vl-7b") for batch in (1, 4)],
                 "prefix", "triton_pct_copy", 80, "prefix length (T = 4, chain)", "verify_attention (Triton, bf16)")

    ax = axes[2]
    before = load(args.before, "kv_cache")
    before = [r for r in before if "triton_us" in r]
    labels = [f"{r['model'][:5]} B{r['B']} p{r['path']}" for r in before]
    after = []
    if args.tune and args.tune.exists():
        import sys
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from fastvlm_kernels.ops.kv_cache import triton as kv_triton

        chosen = dict(TILE_BYTES=kv_triton.TILE_BYTES, NUM_WARPS=kv_triton.NUM_WARPS,
                      PATH_BLOCK_A=kv_triton.PATH_BLOCK_A)   # the launcher's settings
        tune_rows = json.loads(args.tune.read_text())["rows"]
        for r in before:
            match = [t for t in tune_rows if t["section"] == "kv_compact" and t["model"] == r["model"]
                     and t["B"] == r["B"] and t["path"] == r["path"] and t["config"] == chosen and "us" in t]
            after.append(match[0]["us"] if match else float("nan"))
    else:
        after = [r.get("triton_us", float("nan")) for r in load(args.after, "kv_cache") if "triton_us" in r]
    positions = range(len(before))
    ax.bar([p - 0.27 for p in positions], [r["triton_us"] for r in before], 0.27, label="before")
    ax.bar(list(positions), after, 0.27, label="after")
    ax.bar([p + 0.27 for p in positions], [r["same_bytes_copy_us"] for r in before], 0.27, label="same-size copy")
    ax.set_xticks(list(positions))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("µs (device time)")
    ax.set_title("kv_compact, one launch for all layers (Triton)")
    ax.legend(fontsize=8)

    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
