"""Sweep the Triton kernels' launch configurations on a GPU, check every configuration against the reference
on the GPU, and time each with the benchmarks' method; also probe the timing method itself.

    python bench/tune_gpu.py --out DIR [--workers 8] [--sections probe kv_compact lm_head verify_attention]

Two phases, so that the sweep fits a short lease on a GPU: worker processes compile and check every
(case, configuration) job in parallel (Triton's on-disk cache keeps what they compile), then the main
process times the jobs that passed, one at a time, so that timings never overlap. Writes DIR/tune.json (every
row) and DIR/tune.md (per case: the launcher's current choice, the best configuration and both times).

Sections:
- probe: how much of a kernel's measured time the timing method itself adds: a pure read (torch.sum) of
  16 MB to 1 GB, F.linear + argmax and the Triton head, each timed after a write flush (bench/_common.py's
  default: a memset leaves L2 full of dirty lines), a read flush (clean L2) and no flush.
- kv_compact: TILE_BYTES x NUM_WARPS x PATH_BLOCK_A at bench/kv_cache.py's shapes.
- lm_head: BLOCK_M x BLOCK_V x (BLOCK_K, num_stages) x num_warps at bench/lm_head.py's heads, argmax.
- verify_attention: MIN_SPLIT_LEN x SPLIT_WAVES x (BLOCK_N, num_warps, num_stages) at LLaVA / Qwen2-VL shapes.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth_gbps, environment, gpu_time_ms, markdown  # noqa: E402

SECTIONS = ("probe", "kv_compact", "lm_head", "verify_attention")
DEVICE = "cuda"   # a dry run of the job functions on the CPU (TRITON_INTERPRET=1) sets "cpu" and fp16
DTYPE = torch.bfloat16


# ---- kv_compact -------------------------------------------------------------------------------------

def kv_cases():
    for model, layers, heads in (("llava-1.5-7b", 32, 32), ("qwen2-vl-7b", 28, 4)):
        for batch in (1, 4):
            for path in (4, 10):
                yield dict(section="kv_compact", model=model, layers=layers, Hkv=heads, B=batch, path=path)


def kv_configs():
    for tile_bytes, warps, path_block in itertools.product((8192, 16384, 32768, 65536), (2, 4, 8), (8, 16)):
        yield dict(TILE_BYTES=tile_bytes, NUM_WARPS=warps, PATH_BLOCK_A=path_block)


def kv_inputs(case):
    from kv_cache import accepted_path

    torch.manual_seed(case["path"] + case["B"])
    prefix = 1024
    buffer = torch.randn(case["layers"], 2, case["B"], case["Hkv"], prefix + 72, 128, device=DEVICE,
                         dtype=torch.float16)
    start = torch.full((case["B"],), prefix, dtype=torch.int32, device=DEVICE)
    accepted = accepted_path(case["B"], case["path"], seed=case["B"] * 100 + case["path"]).to(DEVICE)
    return buffer, start, accepted


@contextlib.contextmanager
def kv_applied(config):
    from fastvlm_kernels.ops.kv_cache import triton as module

    saved = {name: getattr(module, name) for name in config}
    for name, value in config.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def kv_default():
    from fastvlm_kernels.ops.kv_cache import triton as module
    return dict(TILE_BYTES=module.TILE_BYTES, NUM_WARPS=module.NUM_WARPS, PATH_BLOCK_A=module.PATH_BLOCK_A)


def kv_job(case, inputs, config, check: bool):
    from fastvlm_kernels.ops.kv_cache import kv_compact

    buffer, start, accepted = inputs
    run = lambda: kv_compact(buffer, start, accepted, validate=False, backend="triton")   # noqa: E731
    with kv_applied(config):
        if check:
            expected = buffer.clone()
            kv_compact(expected, start, accepted, backend="torch")
            got = buffer.clone()
            kv_compact(got, start, accepted, validate=False, backend="triton")
            if not torch.equal(got, expected):
                raise AssertionError("differs from the reference")
            return None
        return gpu_time_ms(run)


def kv_extra(case, inputs):
    from kv_cache import moved_bytes

    buffer, _, accepted = inputs
    nbytes = moved_bytes(buffer, accepted)
    same = torch.empty(nbytes // 4, dtype=torch.float16, device=DEVICE)
    same_out = torch.empty_like(same)
    return dict(MB_moved=nbytes / 1e6, same_bytes_copy_us=gpu_time_ms(lambda: same_out.copy_(same)) * 1e3,
                bytes=nbytes)


# ---- lm_head ----------------------------------------------------------------------------------------

LM_HEADS = (("32064x4096", 32064, 4096), ("151936x3584", 151936, 3584))


def lm_cases():
    for name, vocab, hidden in LM_HEADS:
        for rows in (1, 5, 17, 65):
            yield dict(section="lm_head", head=name, V=vocab, H=hidden, M=rows)


def lm_configs(case):
    from fastvlm_kernels.ops.lm_head.triton import _tile_config

    auto = _tile_config(DTYPE, case["M"])["BLOCK_M"]
    block_ms = (auto, 64) if case["M"] > 64 else (auto,)
    for block_m, block_v, (block_k, stages), warps in itertools.product(
            block_ms, (64, 128, 256), ((64, 3), (64, 4), (128, 3)), (4, 8)):
        yield dict(BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=warps, num_stages=stages)


def lm_default(case):
    from fastvlm_kernels.ops.lm_head.triton import _tile_config
    return _tile_config(DTYPE, case["M"])


def lm_inputs(case):
    return head_inputs(case["V"], case["H"], case["M"])


def head_inputs(vocab, hidden_size, num_rows):
    """(weight, norm_weight, hidden), drawn on the device (a CPU draw of a 151936-row head takes seconds)."""
    generator = torch.Generator(device=DEVICE).manual_seed(vocab + num_rows)
    weight = torch.randn(vocab, hidden_size, generator=generator, device=DEVICE, dtype=DTYPE) / hidden_size ** 0.5
    norm_weight = (torch.rand(hidden_size, generator=generator, device=DEVICE) + 0.5).to(DTYPE)
    hidden = torch.randn(num_rows, hidden_size, generator=generator, device=DEVICE, dtype=DTYPE)
    return weight, norm_weight, hidden


@contextlib.contextmanager
def lm_applied(config):
    from fastvlm_kernels.ops.lm_head import triton as module

    saved = module._tile_config
    module._tile_config = lambda dtype, num_rows, **modes: dict(config)
    try:
        yield
    finally:
        module._tile_config = saved


def lm_job(case, inputs, config, check: bool):
    from fastvlm_kernels.ops.lm_head import early_exit_head

    weight, norm_weight, hidden = inputs
    run = lambda: early_exit_head(hidden, norm_weight, weight, eps=1e-6, validate=False,   # noqa: E731
                                  backend="triton")
    with lm_applied(config):
        if check:
            expected = early_exit_head(hidden, norm_weight, weight, eps=1e-6, backend="torch")
            got = run()
            if not torch.equal(got.tokens, expected.tokens):
                raise AssertionError("tokens differ from the reference")
            if not torch.allclose(got.lse, expected.lse, atol=2e-2, rtol=1e-3):
                raise AssertionError(f"lse differs: {(got.lse - expected.lse).abs().max().item():.3g}")
            return None
        return gpu_time_ms(run)


def lm_extra(case, inputs):
    from lm_head import reference_argmax

    weight, norm_weight, hidden = inputs
    return dict(linear_argmax_us=gpu_time_ms(lambda: reference_argmax(hidden, norm_weight, weight)) * 1e3,
                bytes=weight.numel() * weight.element_size())


# ---- verify_attention -------------------------------------------------------------------------------

def va_cases():
    for model, heads, kv_heads, batch in (("llava-1.5-7b", 32, 32, 1), ("qwen2-vl-7b", 28, 4, 1),
                                          ("qwen2-vl-7b", 28, 4, 4)):
        for prefix in (2048, 8192):
            for num_new in (1, 4, 16):
                yield dict(section="verify_attention", model=model, B=batch, Hq=heads, Hkv=kv_heads,
                           prefix=prefix, T=num_new, mask="chain")
    yield dict(section="verify_attention", model="qwen2-vl-7b", B=1, Hq=28, Hkv=4, prefix=8192, T=16,
               mask="tree")


def va_configs():
    for min_split, waves, (block_n, warps, stages) in itertools.product(
            (128, 256), (1, 2, 4), ((64, 4, 3), (64, 8, 3), (128, 8, 3), (32, 4, 4))):
        yield dict(MIN_SPLIT_LEN=min_split, SPLIT_WAVES=waves, BLOCK_N=block_n, num_warps=warps,
                   num_stages=stages)


def va_default(case):
    from fastvlm_kernels.ops.verify_attention import triton as module
    return dict(MIN_SPLIT_LEN=module.MIN_SPLIT_LEN, SPLIT_WAVES=module.SPLIT_WAVES, BLOCK_N="auto",
                num_warps="auto", num_stages="auto")


def va_inputs(case):
    torch.manual_seed(case["prefix"] + case["T"])
    batch, heads, kv_heads, num_new = case["B"], case["Hq"], case["Hkv"], case["T"]
    cache_len = case["prefix"] + num_new
    q = torch.randn(batch, heads, num_new, 128, device=DEVICE, dtype=DTYPE)
    k_cache = torch.randn(batch, kv_heads, cache_len, 128, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    prefix_lens = torch.full((batch,), case["prefix"], dtype=torch.int32, device=DEVICE)
    tree = None
    if case["mask"] == "tree":
        generator = torch.Generator().manual_seed(7)
        parents = [-1] + [int(torch.randint(0, j, (1,), generator=generator)) for j in range(1, num_new)]
        bits = []
        for j in range(num_new):
            row, node = 0, j
            while node >= 0:
                row |= 1 << node
                node = parents[node]
            bits.append(row)
        tree = torch.tensor([bits] * batch, dtype=torch.int64, device=DEVICE)
    return q, k_cache, v_cache, prefix_lens, tree


class _TileOverride(dict):
    def __init__(self, base, tile):
        super().__init__(base)
        self.tile = tile

    def __getitem__(self, key):
        return {**dict.__getitem__(self, key), **self.tile}


@contextlib.contextmanager
def va_applied(config):
    from fastvlm_kernels.ops.verify_attention import triton as module

    saved = module.MIN_SPLIT_LEN, module.SPLIT_WAVES, module._CONFIG_INDEX
    module.MIN_SPLIT_LEN, module.SPLIT_WAVES = config["MIN_SPLIT_LEN"], config["SPLIT_WAVES"]
    if config["BLOCK_N"] != "auto":
        module._CONFIG_INDEX = _TileOverride(saved[2], {k: config[k] for k in ("BLOCK_N", "num_warps", "num_stages")})
    try:
        yield
    finally:
        module.MIN_SPLIT_LEN, module.SPLIT_WAVES, module._CONFIG_INDEX = saved


def va_job(case, inputs, config, check: bool):
    from fastvlm_kernels.ops.verify_attention import verify_attention

    q, k_cache, v_cache, prefix_lens, tree = inputs
    out = torch.empty_like(q)
    run = lambda: verify_attention(q, k_cache, v_cache, prefix_lens, tree, out=out, validate=False,   # noqa: E731
                                   backend="triton")
    with va_applied(config):
        if check:
            expected = verify_attention(q.float(), k_cache.float(), v_cache.float(), prefix_lens, tree,
                                        backend="torch")
            got = run().float()
            error = (got - expected).abs().max().item()
            if not error < 3e-2:
                raise AssertionError(f"max error {error:.3g} against the fp32 reference")
            return None
        return gpu_time_ms(run)


def va_extra(case, inputs):
    _, k_cache, v_cache, _, _ = inputs
    per_position = k_cache.shape[0] * k_cache.shape[1] * k_cache.shape[3] * k_cache.element_size() * 2
    return dict(bytes=per_position * (case["prefix"] + case["T"]))


# ---- the sweep --------------------------------------------------------------------------------------

class Section(NamedTuple):
    """What the sweep needs of one op: its cases, each case's configurations and the launcher's current
    one, the inputs of a case, the job (check, or time in ms, one configuration) and the extra columns."""
    cases: Callable
    configs: Callable
    default: Callable
    inputs: Callable
    job: Callable
    extra: Callable


SECTION_FUNCS = {
    "kv_compact": Section(kv_cases, lambda case: kv_configs(), lambda case: kv_default(), kv_inputs, kv_job,
                          kv_extra),
    "lm_head": Section(lm_cases, lm_configs, lm_default, lm_inputs, lm_job, lm_extra),
    "verify_attention": Section(va_cases, lambda case: va_configs(), va_default, va_inputs, va_job, va_extra),
}


def all_jobs(sections):
    """[(case, [configs])] for the chosen sections; the default configuration first in each list."""
    jobs = []
    for section in sections:
        if section not in SECTION_FUNCS:
            continue
        funcs = SECTION_FUNCS[section]
        for case in funcs.cases():
            listed = [funcs.default(case)] + [c for c in funcs.configs(case) if c != funcs.default(case)]
            jobs.append((case, listed))
    return jobs


def check_worker(args):
    """Runs in a worker process: compiles and checks the given (case index, config index) jobs."""
    sections, worker, num_workers = args
    torch.cuda.set_device(0)
    results = []
    counter = 0
    for case_index, (case, configs) in enumerate(all_jobs(sections)):
        mine = [i for i in range(len(configs)) if (counter + i) % num_workers == worker]
        counter += len(configs)
        if not mine:
            continue
        funcs = SECTION_FUNCS[case["section"]]
        inputs = funcs.inputs(case)
        for config_index in mine:
            try:
                funcs.job(case, inputs, configs[config_index], True)
                results.append((case_index, config_index, ""))
            except Exception as error:  # noqa: BLE001 - a config that does not compile or is wrong is reported
                results.append((case_index, config_index, f"{type(error).__name__}: {str(error)[:200]}"))
        del inputs
        torch.cuda.empty_cache()
    return results


def probe_rows(copy_gbps):
    from fastvlm_kernels.ops.lm_head import early_exit_head
    from lm_head import reference_argmax

    rows = []
    for megabytes in (16, 263, 1089):
        buffer = torch.randn(megabytes * (1 << 20) // 2, device=DEVICE, dtype=DTYPE)
        row = dict(what=f"torch.sum over {megabytes} MiB")
        for flush in ("write", "read", "none"):
            ms = gpu_time_ms(lambda: buffer.sum(), flush=flush)
            row[f"{flush}_flush_us"] = ms * 1e3
            row[f"{flush}_flush_pct_copy"] = 100 * buffer.numel() * 2 / ms / 1e6 / copy_gbps
        rows.append(row)
        print(row, flush=True)
    for name, vocab, hidden_size in LM_HEADS:
        weight, norm_weight, hidden = head_inputs(vocab, hidden_size, 1)
        nbytes = weight.numel() * 2
        chain = lambda: reference_argmax(hidden, norm_weight, weight)  # noqa: E731
        fused = lambda: early_exit_head(hidden, norm_weight, weight, eps=1e-6, validate=False,  # noqa: E731
                                        backend="triton")
        for what, fn in ((f"F.linear + argmax {name} M=1", chain), (f"triton early_exit_head {name} M=1", fused)):
            row = dict(what=what)
            for flush in ("write", "read", "none"):
                ms = gpu_time_ms(fn, flush=flush)
                row[f"{flush}_flush_us"] = ms * 1e3
                row[f"{flush}_flush_pct_copy"] = 100 * nbytes / ms / 1e6 / copy_gbps
            rows.append(row)
            print(row, flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--flush", default=os.environ.get("FASTVLM_BENCH_FLUSH", "write"), choices=("write", "read"),
                        help="the L2 flush of the timed runs (the probe times all three)")
    args = parser.parse_args()
    os.environ["FASTVLM_BENCH_FLUSH"] = args.flush   # gpu_time_ms's default flush
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(DEVICE)
    copy_gbps = copy_bandwidth_gbps(DEVICE)
    report = dict(environment=env, copy_gbps=copy_gbps, flush=args.flush, probe=[], rows=[])

    def save():
        (args.out / "tune.json").write_text(json.dumps(report, indent=1))
        (args.out / "tune.md").write_text(summary(report))

    if "probe" in args.sections:
        started = time.time()
        report["probe"] = probe_rows(copy_gbps)
        print(f"probe: {time.time() - started:.0f} s", flush=True)
        save()

    sections = [s for s in args.sections if s != "probe"]
    jobs = all_jobs(sections)
    started = time.time()
    context = torch.multiprocessing.get_context("spawn")
    with context.Pool(args.workers) as pool:
        checked = [r for part in pool.map(check_worker, [(sections, w, args.workers) for w in range(args.workers)])
                   for r in part]
    errors = {(c, k): e for c, k, e in checked}
    print(f"checked {len(errors)} jobs in {time.time() - started:.0f} s, "
          f"{sum(1 for e in errors.values() if e)} failed", flush=True)

    started = time.time()
    for case_index, (case, configs) in enumerate(jobs):
        funcs = SECTION_FUNCS[case["section"]]
        inputs = funcs.inputs(case)
        extra = funcs.extra(case, inputs)
        for config_index, config in enumerate(configs):
            row = dict(case, config=config, default=config_index == 0, **extra)
            error = errors.get((case_index, config_index), "not checked")
            if error:
                row["error"] = error
            else:
                try:
                    row["us"] = funcs.job(case, inputs, config, False) * 1e3
                    row["pct_copy"] = 100 * extra["bytes"] / (row["us"] * 1e-6) / 1e9 / copy_gbps
                except Exception as timing_error:  # noqa: BLE001
                    row["error"] = f"timing: {timing_error}"
            report["rows"].append(row)
        best = min((r for r in report["rows"][-len(configs):] if "us" in r), key=lambda r: r["us"], default=None)
        if best:
            print(f"{case} best {best['us']:.2f} us {best['config']}", flush=True)
        del inputs
        torch.cuda.empty_cache()
        save()
    print(f"timed in {time.time() - started:.0f} s", flush=True)
    save()


def summary(report) -> str:
    lines = [f"# Triton launch-configuration sweep on {report['environment']['device']}, "
             f"{report['environment']['date']}", "",
             f"torch {report['environment']['torch']}, triton {report['environment'].get('triton')}; "
             f"copy bandwidth {report['copy_gbps']:.0f} GB/s; timed runs after a {report['flush']} flush "
             "(bench/_common.gpu_time_ms)", ""]
    if report["probe"]:
        lines.append(markdown(report["probe"], "## Timing-method probe (µs and % of copy bandwidth)"))
    for section in SECTION_FUNCS:
        rows_by_case = {}
        for row in report["rows"]:
            if row["section"] != section:
                continue
            key = json.dumps({k: v for k, v in row.items() if k not in (
                "section", "config", "default", "us", "pct_copy", "error", "MB_moved", "same_bytes_copy_us", "bytes",
                "linear_argmax_us")})
            rows_by_case.setdefault(key, []).append(row)
        table = []
        for key, rows in rows_by_case.items():
            entry = json.loads(key)
            timed = [r for r in rows if "us" in r]
            default = next((r for r in rows if r["default"]), {})
            best = min(timed, key=lambda r: r["us"]) if timed else {}
            for name in ("MB_moved", "same_bytes_copy_us", "linear_argmax_us"):
                if name in rows[0]:
                    entry[name] = rows[0][name]
            entry["default_us"] = default.get("us", float("nan"))
            entry["default_pct_copy"] = default.get("pct_copy", float("nan"))
            entry["best_us"] = best.get("us", float("nan"))
            entry["best_pct_copy"] = best.get("pct_copy", float("nan"))
            entry["best_config"] = " ".join(f"{k}={v}" for k, v in best.get("config", {}).items())
            entry["configs"] = len(rows)
            entry["failed"] = sum(1 for r in rows if "error" in r)
            table.append(entry)
        if table:
            lines.append(markdown(table, f"## {section}: the launcher's current choice and the sweep's best (µs)"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
