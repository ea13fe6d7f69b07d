"""Benchmark skinny_linear on the CPU against torch's own linear (MKL / oneDNN) for the few rows a decoder step
multiplies: every projection of a decoder layer (q, k, v, o, gate, up, down), over 30 layers whose weights are
distinct (so they come from memory, as in a decoder pass, not from cache), for M = 1 .. 16 rows.

    python bench/linear.py --threads 1                     # SmolLM2-135M's and the tiny VLM's layer shapes
    python bench/linear.py --threads 1 --json out.json --md out.md --plot out.png

Each row: milliseconds per layer's projections (median of alternated turns), GB/s of weight read, and the
ratio torch / skinny (> 1: the kernel is faster). Both results are checked against each other first.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import environment, format_row, op_parser, write_results  # noqa: E402
from fastvlm_kernels.ops.linear import cpu_isa, skinny_linear_plan  # noqa: E402

# (name, hidden, intermediate, kv width): the projections of one Llama-style layer
MODELS = [("smollm2-135m", 576, 1536, 192), ("tiny-vlm", 256, 1024, 128)]
LAYERS = 30


def layer_shapes(hidden: int, intermediate: int, kv: int):
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (intermediate, hidden),
            (intermediate, hidden), (hidden, intermediate)]


def main():
    parser = op_parser(__doc__.splitlines()[0], 0.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=list(range(1, 17)))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows_out = []
    generator = torch.Generator().manual_seed(0)
    for name, hidden, intermediate, kv in MODELS:
        shapes = layer_shapes(hidden, intermediate, kv)
        layers = [[torch.randn(o, i, generator=generator) for o, i in shapes] for _ in range(LAYERS)]
        weight_bytes = sum(o * i * 4 for o, i in shapes)
        plan = skinny_linear_plan(torch.empty(1, hidden), layers[0][0])
        if plan.backend.name != "cpu":
            raise SystemExit(f"skinny_linear's CPU kernel cannot run here: backend {plan.backend.name}")
        for m in args.rows:
            inputs = {i: torch.randn(m, i, generator=generator) for i in {i for _, i in shapes}}
            for weight in layers[0]:
                torch.testing.assert_close(plan.run(inputs[weight.shape[1]], weight),
                                           F.linear(inputs[weight.shape[1]], weight), rtol=1e-4, atol=1e-4)
            functions = {"torch": F.linear, "skinny": plan.run}
            times = {key: [] for key in functions}
            for turn in range(args.repeats + 1):
                order = list(functions) if turn % 2 == 0 else list(functions)[::-1]
                for key in order:
                    fn = functions[key]
                    start = time.perf_counter()
                    for layer in layers:
                        for weight in layer:
                            fn(inputs[weight.shape[1]], weight)
                    if turn:                       # the first turn warms up
                        times[key].append((time.perf_counter() - start) / LAYERS)
            medians = {key: sorted(values)[len(values) // 2] for key, values in times.items()}
            row = dict(model=name, rows=m, torch_ms=medians["torch"] * 1e3, skinny_ms=medians["skinny"] * 1e3,
                       skinny_gbps=weight_bytes / medians["skinny"] / 1e9,
                       speedup=medians["torch"] / medians["skinny"])
            rows_out.append(row)
            print(format_row(row), flush=True)
    env = environment("cpu")
    env.update(isa_bits=cpu_isa(), layers=LAYERS)
    write_results(args, env, rows_out, "skinny_linear vs torch's linear, one layer's projections", "ms per layer")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        figure, axes = plt.subplots(1, len(MODELS), figsize=(6 * len(MODELS), 4), squeeze=False)
        for axis, (name, *_rest) in zip(axes[0], MODELS):
            subset = [row for row in rows_out if row["model"] == name]
            axis.plot([r["rows"] for r in subset], [r["torch_ms"] for r in subset], "o-", label="torch (F.linear)")
            axis.plot([r["rows"] for r in subset], [r["skinny_ms"] for r in subset], "o-", label="skinny_linear")
            axis.set_title(f"{name}: one layer's projections")
            axis.set_xlabel("rows M")
            axis.set_ylabel("ms")
            axis.set_ylim(bottom=0)
            axis.legend()
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
