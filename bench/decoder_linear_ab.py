"""The decoder with its lean layers' projections on skinny_linear (linear_backend="auto") against F.linear
("torch"), and model.generate, timed in alternated turns in one process (batch 1, greedy, outputs checked
identical first).

    python bench/decoder_linear_ab.py tiny       # 4 new scenes, 32 new tokens, k = 0 and 8 with the network
    python bench/decoder_linear_ab.py smollm2    # 3 held-out prompts (build/smollm2_data/heldout), 64 tokens, k = 0, 1
"""
from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastvlm_kernels.decoding import SelfSpeculativeDecoder  # noqa: E402
from fastvlm_kernels.imitation import ImitationNetwork  # noqa: E402


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "tiny"
    torch.set_num_threads(1)
    if which == "tiny":
        from fastvlm_kernels.models import tiny
        model, processor = tiny.load(dtype=torch.float32)
        network = ImitationNetwork.from_pretrained(tiny.FOLDER / "imitation", model)
        inputs = []
        for seed in range(4):
            image, prompt = tiny.scene(seed, kind="describe")
            encoded = processor(images=[image], text=[prompt], return_tensors="pt")
            inputs.append({k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)})
        exit_layer, max_new, draft_lens = tiny.EXIT_LAYER, 32, (0, 8)
    elif which == "smollm2":
        from fastvlm_kernels.models import smollm2
        model, tokenizer = smollm2.load(torch.float32)
        network = ImitationNetwork.from_pretrained(Path(smollm2.__file__).parent / "imitation", model)
        path = Path("build/smollm2_data/heldout/prompts.jsonl")
        if not path.is_file():
            raise SystemExit(f"{path}: make it with python python/build_smollm2_data.py --splits heldout --limit 24")
        prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
        random.Random(0).shuffle(prompts)
        inputs = [tokenizer([prompt], return_tensors="pt") for prompt in prompts[:3]]
        exit_layer, max_new, draft_lens = network.config.exit_layer, 64, (0, 1)
    else:
        raise SystemExit("usage: decoder_linear_ab.py tiny | smollm2")
    expected = [model.generate(**i, max_new_tokens=max_new, do_sample=False) for i in inputs]
    functions = {"generate": lambda: [model.generate(**i, max_new_tokens=max_new, do_sample=False) for i in inputs]}
    for k in draft_lens:
        for backend in ("torch", "auto"):
            decoder = SelfSpeculativeDecoder(model, exit_layer, imitation=network, draft_len=k, linear_backend=backend)
            for i, want in zip(inputs, expected):
                if not torch.equal(decoder.generate(**i, max_new_tokens=max_new).sequences, want):
                    raise SystemExit(f"k={k} linear_backend={backend}: output differs from generate")
            functions[f"k{k}-{backend}"] = lambda d=decoder: [d.generate(**i, max_new_tokens=max_new) for i in inputs]
    times = {name: [] for name in functions}
    for turn in range(5):
        for name in (list(functions) if turn % 2 else list(functions)[::-1]):
            start = time.perf_counter()
            functions[name]()
            times[name].append(time.perf_counter() - start)
            print(f"  turn {turn + 1}/5: {name} {times[name][-1]:.2f} s", flush=True)
    baseline = statistics.median(times["generate"])
    for name, values in times.items():
        print(f"{which} {name:14s} {statistics.median(values):.3f} s  {baseline / statistics.median(values):.2f}x generate")


if __name__ == "__main__":
    main()
