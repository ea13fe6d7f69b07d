"""What every benchmark script prints and writes the same way: a row per line, a markdown table, and the
environment the numbers were taken in (device, versions, date)."""
import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

HIDDEN_IN_LOG = ("copy_gbps",)  # the same in every row: printed once by the scripts that measure it


def format_row(row: dict) -> str:
    return "  ".join(f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in row.items() if key not in HIDDEN_IN_LOG)


def span(rows, key: str, digits: int = 0) -> str:
    """"low-high" of ``key`` over ``rows``: a benchmark's summary line."""
    values = [row[key] for row in rows]
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def markdown(rows, header: str) -> str:
    if not rows:
        return header + "\n\n(no rows)\n"
    keys = list(dict.fromkeys(key for row in rows for key in row))
    lines = [header, "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.2f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict:
    info = dict(date=datetime.date.today().isoformat(), python=platform.python_version(), torch=torch.__version__,
                machine=platform.machine(), threads=torch.get_num_threads())
    info["device"] = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else _cpu_name()
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def op_parser(description: str, min_time: float) -> argparse.ArgumentParser:
    """The options every op benchmark takes (--device, --min-time, --json, --md); a script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--min-time", type=float, default=min_time, help="CPU: seconds per measurement")
    parser.add_argument("--json", type=Path, help="write the rows and the environment here")
    parser.add_argument("--md", type=Path, help="write a markdown table here")
    return parser


def write_results(args, env: dict, rows, title: str, units: str) -> None:
    """--json: the rows and the environment; --md: a table headed by the op, device, date and units."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown(rows, f"# {title} on {env['device']}, {env['date']}\n\n"
                                          f"torch {env['torch']}, {env['threads']} threads; {units}"))


def copy_bandwidth_gbps(device: str = "cuda") -> float:
    """The device's measured copy bandwidth (bytes read + written by cloning 1 GiB, cold L2): the roofline
    that every bandwidth-bound kernel's GB/s is reported against."""
    import triton.testing

    buffer = torch.empty(1 << 29, dtype=torch.float16, device=device)
    copy_ms = triton.testing.do_bench(lambda: buffer.clone(), warmup=25, rep=200)
    gbps = 2 * buffer.numel() * buffer.element_size() / copy_ms / 1e6
    print(f"measured copy bandwidth (1 GiB clone): {gbps:.0f} GB/s", flush=True)
    return gbps


_FLUSH = {}
_READ_US = {}


def same_size_read_us(nbytes: int) -> float:
    """Device time (µs, gpu_time_ms) of torch.sum over a buffer of ``nbytes``: what reading that many bytes
    costs a tuned single kernel, launch and latency included (a 16 MiB read reaches a third of the copy
    bandwidth on an H200, 1 GiB over 90%): the practical roofline of a read-bound op of that size."""
    if nbytes not in _READ_US:
        buffer = torch.randn(max(nbytes // 2, 1), dtype=torch.bfloat16, device="cuda")
        _READ_US[nbytes] = gpu_time_ms(lambda: buffer.sum()) * 1e3
    return _READ_US[nbytes]


def gpu_time_ms(fn, warmup=None, rep=None, iters: int = 10, flush: Optional[str] = None) -> float:
    """Device time of one ``fn()`` in ms with a cold L2 and the host out of the way: ``iters`` calls, each
    after an L2 flush, are captured in a CUDA graph and replayed, and a graph of the flushes alone is
    subtracted. ``flush``: "write" (a 256 MB memset, which leaves L2 full of dirty lines that ``fn`` then
    pays to write back), "read" (a sum over 256 MB: L2 left clean, as after a model's weight reads) or
    "none" (warm L2); by default $FASTVLM_BENCH_FLUSH, else "write". Eager timing (``triton.testing.do_bench``) of a small kernel measures the Python and
    launch path instead (tens to hundreds of µs on a GPU host: bench/profile_gpu.py); that is the fallback
    when ``fn`` cannot be captured (a host sync, a CPU generator). ``warmup``/``rep`` are accepted for
    do_bench's signature."""
    import triton.testing

    buffer = _FLUSH.setdefault("buffer", torch.empty(64 << 20, dtype=torch.int32, device="cuda"))
    flush = flush or os.environ.get("FASTVLM_BENCH_FLUSH", "write")
    if flush == "read":
        total = _FLUSH.setdefault("total", torch.empty((), dtype=torch.int64, device="cuda"))
        evict = lambda: torch.sum(buffer, dtype=torch.int64, out=total)   # noqa: E731
    elif flush == "write":
        evict = buffer.zero_
    elif flush == "none":
        evict = None
    else:
        raise ValueError(f"flush must be 'write', 'read' or 'none', got {flush!r}")
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                if evict is not None:
                    evict()
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        work, flushes = torch.cuda.CUDAGraph(), (torch.cuda.CUDAGraph() if evict is not None else None)
        with torch.cuda.graph(work):
            for _ in range(iters):
                if evict is not None:
                    evict()
                fn()
        if flushes is not None:
            with torch.cuda.graph(flushes):
                for _ in range(iters):
                    evict()
    except Exception:  # noqa: BLE001 - not capturable: time it eagerly instead
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, **{k: v for k, v in (("warmup", warmup), ("rep", rep)) if v is not None})

    def replay_ms_once(graph) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def replay_ms(graph) -> float:
        return sorted(replay_ms_once(graph) for _ in range(7))[3]

    # Work and flush graphs replayed in adjacent pairs, the median of the differences, so that a drift of the
    # memsets' time between two batches of replays cannot shift a small kernel's figure (one pass of
    # bench/kv_cache.py on an H200 timed two kernels below a same-size copy, 5 us under the sweep's figures).
    replay_ms(work)
    if flushes is None:
        return max(replay_ms(work), 1e-6) / iters
    differences = sorted(replay_ms_once(work) - replay_ms_once(flushes) for _ in range(9))
    return max(differences[len(differences) // 2], 1e-6) / iters


def cpu_time_us(fn, min_run_time: float) -> float:
    """Median µs per call of ``fn`` (torch.utils.benchmark, blocked autorange) at the process's thread count:
    the Timer's own default is one thread, whatever torch.set_num_threads says."""
    from torch.utils import benchmark
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def alternate(functions: dict, repeats: int, min_time: float = 0.0, max_calls: int = 50, *, warmup: bool = True,
              progress: Optional[Callable[[str], None]] = None) -> dict:
    """Median seconds per call of each function, called one at a time in turns (the order reversed every turn),
    so that machine load and drift hit all alike and none always runs right after the same other; at least
    ``repeats`` calls each and ``min_time`` seconds in all, at most ``max_calls`` calls each. ``warmup`` calls
    each once untimed first; ``progress`` gets one line per timed call (for calls that take seconds)."""
    if warmup:
        for fn in functions.values():
            fn()
    names = list(functions)
    times = {name: [] for name in names}
    start = time.perf_counter()
    calls = 0
    while (calls < repeats or time.perf_counter() - start < min_time) and calls < max_calls:
        for name in names if calls % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - t0)
            if progress is not None:
                progress(f"timing turn {calls + 1}/{repeats}: {name} {times[name][-1]:.2f} s")
        calls += 1
    return {name: statistics.median(values) for name, values in times.items()}


def seconds_over_prompts(inputs, configs, run: Callable, turns: int, repetition: int = 0) -> dict:
    """Per configuration, its seconds over all ``inputs``: each input runs under every configuration back to
    back ``turns`` times (:func:`alternate`: the order reversed every turn; rotated from input to input and from
    repetition to repetition, so that no configuration always follows the same one), and a configuration's time
    on an input is the median of its turns. ``run(config, input)`` makes one timed call."""
    configs = list(configs)
    seconds = dict.fromkeys(configs, 0.0)
    for p, item in enumerate(inputs):
        shift = (p + repetition) % len(configs)
        order = configs[shift:] + configs[:shift]
        medians = alternate({config: (lambda config=config: run(config, item)) for config in order}, turns,
                            max_calls=turns, warmup=False)
        for config in configs:
            seconds[config] += medians[config]
    return seconds


def repetition_bars(path, groups, values_per_repetition, *, ylabel: str, title: str, lines=(), fontsize=None) -> None:
    """A bar chart of one value per group and repetition (``values_per_repetition[r][g]``), grouped bars side by
    side, with horizontal reference ``lines`` ((y, color, linestyle, label), ...); written to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4))
    repetitions = len(values_per_repetition)
    width = 0.8 / repetitions
    for r, values in enumerate(values_per_repetition):
        axis.bar([x + r * width for x in range(len(groups))], values, width, label=f"repetition {r + 1}")
    for y, color, linestyle, label in lines:
        axis.axhline(y, color=color, linestyle=linestyle, linewidth=1, label=label)
    axis.set_xticks([x + width * (repetitions - 1) / 2 for x in range(len(groups))], groups, fontsize=fontsize)
    axis.set_ylabel(ylabel)
    axis.set_ylim(0.8, max(max(values) for values in values_per_repetition) * 1.05)
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")
