"""What logits processors cost the decoder: SmolLM2 with its shipped network, CPU, batch 1, greedy (issue 27:
"with a repetition penalty, the overhead measured, aiming at 10% or less").

    python bench/processors.py [--repetitions 3 --turns 3 --threads 1 --penalty 1.1 --json F --md F --plot F.png]

Per decoder (adaptive and k = 2) and for model.generate, three settings on the 6 everyday chat prompts of
bench/adaptive.py (64 new tokens): no processor; `repetition_penalty=1.0001`, which leaves the tokens of these
prompts unchanged (checked) so the difference is the processing alone (full logits through skinny_linear, the
processors per position, the draft through its vocabulary subset); and `repetition_penalty=--penalty`, which
changes the answers (so also the acceptance). Every configuration is first checked token-identical to
model.generate with the same options. Then, per repetition and prompt, every configuration runs `--turns` times
back to back (order rotated per prompt, reversed per turn); a configuration's time on a prompt is the median of
its turns. Reported per repetition: each configuration's seconds, the processing overhead (time with the penalty
/ time without, per decoder) and the speedup over model.generate with the same options. Also timed: what the
option resolution and the processors' construction cost one call with no processor active.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown, repetition_bars, seconds_over_prompts, write_results  # noqa: E402
from adaptive import CHAT  # noqa: E402
from fastvlm_kernels.decoding import SelfSpeculativeDecoder  # noqa: E402
from fastvlm_kernels.decoding.options import resolve  # noqa: E402
from fastvlm_kernels.decoding.processing import Processing  # noqa: E402
from fastvlm_kernels.ops.linear import cpu_isa  # noqa: E402


def setup_cost_ms(model, inputs, repeats: int = 50) -> float:
    """Median milliseconds of the options' resolution and the processors' construction for one call."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        options, _ = resolve(model, inputs["input_ids"], inputs["attention_mask"], {"max_new_tokens": 64})
        Processing.build(model, inputs["input_ids"], inputs["attention_mask"], options.config)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--penalty", type=float, default=1.1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from fastvlm_kernels.models import smollm2
    model, tokenizer = smollm2.load(torch.float32)
    network = smollm2.load_imitation(model)
    inputs = [smollm2.chat_inputs(tokenizer, [question]) for question in CHAT]
    max_new = args.max_new_tokens
    settings = {"none": {}, "penalty 1.0001": {"repetition_penalty": 1.0001},
                f"penalty {args.penalty:g}": {"repetition_penalty": args.penalty}}
    runners = {"generate": lambda i, o: model.generate(**i, max_new_tokens=max_new, do_sample=False, **o)}
    for label, draft_len in (("adaptive", "adaptive"), ("k2", 2)):
        decoder = SelfSpeculativeDecoder(model, imitation=network, draft_len=draft_len)
        runners[label] = (lambda d: lambda i, o: d.generate(**i, max_new_tokens=max_new, do_sample=False, **o).sequences)(decoder)
    configs = [(runner, setting) for runner in runners for setting in settings]
    plain = [runners["generate"](i, {}) for i in inputs]
    same_tokens = True
    for setting, options in settings.items():
        for i, unprocessed in zip(inputs, plain):
            want = runners["generate"](i, options)
            if setting == "penalty 1.0001":
                same_tokens &= torch.equal(want, unprocessed)
            for name in ("adaptive", "k2"):
                if not torch.equal(runners[name](i, options), want):
                    raise SystemExit(f"{name} with {setting}: output differs from model.generate")
    print(f"every configuration identical to model.generate; penalty 1.0001 leaves the tokens unchanged: {same_tokens}")
    setup_ms = setup_cost_ms(model, inputs[0])
    print(f"options + processors set up per call (no processor active): {setup_ms:.2f} ms")
    rows = []
    for repetition in range(args.repetitions):
        seconds = seconds_over_prompts(inputs, configs, lambda config, i: runners[config[0]](i, settings[config[1]]),
                                       args.turns, repetition)
        for runner, setting in configs:
            value = seconds[runner, setting]
            rows.append(dict(repetition=repetition + 1, config=runner, processors=setting, seconds=value,
                             overhead=value / seconds[runner, "none"],
                             speedup_vs_generate=seconds["generate", setting] / value, identical=True))
        print(f"repetition {repetition + 1}: " + "  ".join(
            f"{r}/{s} {seconds[r, s]:.2f} s" for r, s in configs), flush=True)
        print("  overhead (time with / without): " + "  ".join(
            f"{r}/{s} {seconds[r, s] / seconds[r, 'none']:.3f}" for r, s in configs if s != "none"), flush=True)
    env = environment("cpu")
    env.update(model="SmolLM2-135M-Instruct", max_new_tokens=max_new, prompts=len(inputs), turns=args.turns,
               penalty_1_0001_same_tokens=same_tokens, setup_ms_per_call=setup_ms)
    env["cpu_isa"] = {512: "AVX-512", 256: "AVX2"}.get(cpu_isa(), "no AVX2")
    args.device, md = "cpu", args.md
    args.md = None
    write_results(args, env, rows, "", "")
    if md is not None:
        shown = [{key: f"{value:.3f}" if isinstance(value, float) else value for key, value in row.items()}
                 for row in rows]
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(markdown(shown, f"# logits processors' cost, SmolLM2-135M-Instruct + network on "
                                      f"{env['device']} ({env['cpu_isa']}), {env['date']}\n\ntorch {env['torch']}, "
                                      f"{env['threads']} thread(s), {len(inputs)} prompts x {max_new} new tokens, "
                                      f"greedy, median of {args.turns} turns per prompt; overhead = seconds / the "
                                      f"same configuration's seconds without processors; options and processors "
                                      f"set up in {setup_ms:.2f} ms per call"))
    if args.plot:
        shown = [f"{r}\n{s}" for r, s in configs if s != "none"]
        repetition_bars(args.plot, shown, [[row["overhead"] for row in rows if row["repetition"] == r + 1
                                            and row["processors"] != "none"] for r in range(args.repetitions)],
                        ylabel="time / same configuration without processors", fontsize=8,
                        lines=[(1.10, "red", "--", "+10%")],
                        title=f"SmolLM2: cost of a repetition penalty ({env['date']})")


if __name__ == "__main__":
    main()
