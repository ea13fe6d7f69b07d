"""The imitation network's decoder layer under tensor parallel, split by the rank against replicated, timed.

Split is what the decoder runs (docs/design.md, "Tensor parallel"): the network, loaded whole on every rank
beside the sharded model, is cut like the backbone's layers (this rank's query and KV heads and MLP share;
``LeanLayer(layer, linear, parallel)``), its KV heads live in the rank's cache beside the backbone's, and each
layer all-reduces twice (after the attention output and the down projection). Replicated is the simplest
alternative: every rank runs the whole layer (``LeanLayer(layer, linear)``, no collective) over a cache of its
own that holds every KV head. Each variant is checked against the other on the same input first, then both
are timed at a draft step's shape (one new token per row over a prefix of ``--prefix`` positions, the cache
rolled back after each call as a rejected draft is), in blocks of calls alternating between the two (the order
reversed every repeat), every block started together on all ranks (a barrier) and timed as its slowest rank
(all ranks wait for it in a step). Layer shapes: the tiny VLM's shipped one-layer network (exit layer 1) and
random-weight layers of the shapes of two public models whose head counts 2 ranks divide.

    torchrun --nproc_per_node 2 bench/tp_imitation.py --md bench/results/cpu-2026-12-07-tp-imitation-split.md
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvlm_kernels.cache import KVCache  # noqa: E402
from fastvlm_kernels.decoding import lean  # noqa: E402
from fastvlm_kernels.decoding.attention import StepState  # noqa: E402
from fastvlm_kernels.decoding.parallel import TensorParallel  # noqa: E402

# (name, transformers config class, layer class, config fields, calls per block): the shapes of public models'
# decoder layers (an imitation network's layers are the model's own layer class)
SHAPES = [
    ("Qwen2-0.5B layer", "Qwen2Config", "Qwen2DecoderLayer",
     dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2), 40),
    ("Llama-3.2-1B layer", "LlamaConfig", "LlamaDecoderLayer",
     dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64), 8),
]


def tiny_network_layer():
    """The tiny VLM's shipped exit-layer-1 network's decoder layer (one layer of width 256, 4 / 2 heads)."""
    from fastvlm_kernels.models import tiny
    model, _ = tiny.load()
    network = tiny.load_imitation(model, exit_layer=1)
    return network.layers[0].eval(), model.config.text_config


def _modeling(config) -> object:
    """transformers' modeling module of ``config``'s family (its layer and rotary classes)."""
    import importlib
    family = type(config).__name__[:-len("Config")].lower()
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def public_shape_layer(config_class: str, layer_class: str, fields: dict, layer_idx: int):
    """A random-weight decoder layer of ``fields``' shape at index ``layer_idx`` (as a network's layer is N + i)."""
    import transformers
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(num_hidden_layers=layer_idx + 1, vocab_size=128, **fields)
    layer = getattr(_modeling(config), layer_class)(config, layer_idx)
    with torch.no_grad():
        for parameter in layer.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.02)
    return layer.eval(), config


class Variant:
    """One way to run the layer at a draft step's shape: its lean layer, its cache and state, one call."""

    def __init__(self, layer, config, parallel, batch: int, prefix: int, linear):
        self.lean = lean.LeanLayer(layer, linear, parallel)
        heads = config.num_key_value_heads // (parallel.world_size if parallel is not None else 1)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        index = layer.self_attn.layer_idx
        self.cache = KVCache(index + 1, batch, heads, head_dim, prefix + 8, torch.float32)
        # the same keys and values in both variants' caches: split holds the rank's block of the KV heads
        full = torch.randn((index + 1, 2, batch, config.num_key_value_heads, prefix + 8, head_dim),
                           generator=torch.Generator().manual_seed(1))
        self.cache.buffer.copy_(full if parallel is None else full.chunk(parallel.world_size, dim=3)[parallel.rank])
        self.lengths = torch.full((batch,), prefix, dtype=torch.int32)
        self.host = [prefix] * batch
        self.cache.rollback_unchecked(self.lengths, self.host)
        self.state = StepState(self.cache, self.lengths.clone())

    def __call__(self, hidden, cos, sin):
        out = self.lean(hidden, cos, sin, self.state)
        self.cache.rollback_unchecked(self.lengths, self.host, slice(self.lean.layer_idx, self.lean.layer_idx + 1))
        return out


def rotary(config, batch: int, position: int):
    """cos / sin ``[B, 1, 1, D]`` at ``position`` (the lean layers take them unsqueezed for the heads)."""
    module = _modeling(config)
    embedding = getattr(module, [name for name in dir(module) if name.endswith("RotaryEmbedding")][0])(config)
    hidden = torch.zeros(batch, 1, config.hidden_size)
    cos, sin = embedding(hidden, torch.full((batch, 1), position))
    return cos.unsqueeze(1), sin.unsqueeze(1)


class AllReduces:
    """The collectives split adds, alone: two all-reduces of ``[B, 1, H]`` (what a split layer call sums)."""

    def __init__(self, parallel: TensorParallel):
        self.parallel = parallel

    def __call__(self, hidden, cos, sin):
        self.parallel.all_reduce(hidden.clone())
        return self.parallel.all_reduce(hidden.clone())


def timed_block(variant, hidden, cos, sin, calls: int, dist) -> float:
    """Seconds per call of ``calls`` calls, started together on every rank, as the slowest rank took them."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        variant(hidden, cos, sin)
    seconds = torch.tensor([(time.perf_counter() - start) / calls], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return float(seconds)


def _quartiles(values) -> str:
    quartiles = statistics.quantiles(values, n=4)
    return f"{quartiles[0]:.0f}-{quartiles[2]:.0f}"


def cpu_flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "(lscpu unavailable)"
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L2 cache", "L3 cache", "Flags")
    return "\n".join(line for line in out.splitlines() if line.split(":")[0].strip() in keep)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="blocks of calls per variant (alternating)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prefix", type=int, default=256, help="positions already in the cache")
    parser.add_argument("--md", type=Path, help="write the table, the command and the machine here (rank 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    layers = [("tiny VLM exit-1 network (shipped)", *tiny_network_layer(), 300)]
    for name, config_class, layer_class, fields, calls in SHAPES:
        layers.append((name, *public_shape_layer(config_class, layer_class, fields, layer_idx=2), calls))
    rows = []
    with torch.no_grad():
        for name, layer, config, calls in layers:
            heads = config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            parallel = TensorParallel(dist.group.WORLD, rank, world_size, heads // world_size,
                                      config.num_key_value_heads // world_size, head_dim, None, False, "cpu")
            linear = lean.linear_for_weight(layer.self_attn.q_proj.weight, "auto")
            variants = {"split": Variant(layer, config, parallel, args.batch, args.prefix, linear),
                        "replicated": Variant(layer, config, None, args.batch, args.prefix, linear)}
            hidden = torch.randn(args.batch, 1, config.hidden_size, generator=torch.Generator().manual_seed(2))
            cos, sin = rotary(config, args.batch, args.prefix)
            outputs = {key: variant(hidden, cos, sin) for key, variant in variants.items()}   # and a warm-up
            error = float((outputs["split"] - outputs["replicated"]).abs().max())
            scale = float(outputs["replicated"].abs().max())
            if not error <= 1e-5 * max(scale, 1.0):
                raise SystemExit(f"{name}: split and replicated disagree (max |difference| {error:.3g})")
            parallel.reset_counts()
            variants["split"](hidden, cos, sin)
            per_call = dict(parallel.collectives)
            variants["2 all-reduces"] = AllReduces(parallel)
            times = {key: [] for key in variants}
            for repeat in range(args.repeats):
                for key in (list(variants) if repeat % 2 == 0 else list(reversed(variants))):
                    times[key].append(timed_block(variants[key], hidden, cos, sin, calls, dist))
            us = {key: sorted(value * 1e6 for value in values) for key, values in times.items()}
            split, replicated = (statistics.median(us[key]) for key in ("split", "replicated"))
            params = sum(p.numel() for p in layer.parameters())
            row = dict(layer=name, hidden=config.hidden_size, heads=f"{heads}/{config.num_key_value_heads}",
                       params_M=params / 1e6, split_us=split, replicated_us=replicated,
                       replicated_over_split=replicated / split, split_all_reduces=per_call["all_reduce"],
                       all_reduces_us=statistics.median(us["2 all-reduces"]),
                       split_quartiles=_quartiles(us["split"]), replicated_quartiles=_quartiles(us["replicated"]),
                       max_abs_difference=error)
            rows.append(row)
            say("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                flush=True)
    if rank == 0 and args.md is not None:
        command = "torchrun --nproc_per_node {} bench/tp_imitation.py {}".format(
            world_size, " ".join(sys.argv[1:]))
        lines = [f"# The imitation network's layer under tensor parallel: split vs replicated ({world_size} gloo "
                 f"ranks, CPU)", "", f"{datetime.date.today().isoformat()}, torch {torch.__version__}, one thread a "
                 f"rank, batch {args.batch}, one new token over {args.prefix} cached positions, {args.repeats} "
                 f"blocks per variant alternating; microseconds per layer call: the median block (the quartiles "
                 f"of the blocks beside it), each block as its slowest rank. \"2 all-reduces\": the two "
                 f"collectives a split call adds, timed alone the same way.", "", "```bash", command, "```", "",
                 "| layer | hidden | heads (q/kv) | params (M) | split (us) | replicated (us) | replicated / split "
                 "| 2 all-reduces alone (us) | max abs difference |", "|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['layer']} | {row['hidden']} | {row['heads']} | {row['params_M']:.2f} | "
                         f"{row['split_us']:.0f} ({row['split_quartiles']}) | {row['replicated_us']:.0f} "
                         f"({row['replicated_quartiles']}) | {row['replicated_over_split']:.2f} | "
                         f"{row['all_reduces_us']:.0f} | {row['max_abs_difference']:.1e} |")
        lines += ["", "Machine (`lscpu`):", "", "```", cpu_flags(), "```", ""]
        args.md.write_text("\n".join(lines))
        say(f"wrote {args.md}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
