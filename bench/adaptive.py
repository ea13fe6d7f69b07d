"""Adaptive drafting against every fixed draft length, in one run: issue 25's bar ("within 5% of the best fixed
setting in every repetition; never more than 3% slower than plain where drafting does not pay").

    python bench/adaptive.py tiny        # 6 scenes the tests do not use, 48 new tokens, k = 0, 2, 4, 6, 8
    python bench/adaptive.py smollm2     # 4 everyday chat prompts (unlike the training templates), 64 tokens, k = 0..3

Rows: the decoder's current adaptive policy (`draft_len="adaptive"`) and policy.CostModelDraftLen (set on a
decoder as its `policy`), beside each fixed k; every configuration is checked token-identical to
`model.generate` first, then timed in alternated turns (the order reversed each repetition). Each repetition
prints each configuration's time relative to the best fixed k of that repetition.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastvlm_kernels.decoding import SelfSpeculativeDecoder  # noqa: E402
from fastvlm_kernels.decoding.policy import CostModelDraftLen  # noqa: E402
from fastvlm_kernels.imitation import ImitationNetwork  # noqa: E402

CHAT = ["Write a short thank-you note to a colleague who helped me move.",
        "Explain what a hash table is in two sentences.",
        "What is 17 times 23? Show the steps.",
        "Translate 'good morning, how are you?' into French and Spanish."]


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "tiny"
    repetitions = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch.set_num_threads(1)
    if which == "tiny":
        from fastvlm_kernels.models import tiny
        model, processor = tiny.load(dtype=torch.float32)
        network = ImitationNetwork.from_pretrained(tiny.FOLDER / "imitation", model)
        inputs = []
        for seed in range(100, 106):
            image, prompt = tiny.scene(seed, kind="describe")
            encoded = processor(images=[image], text=[prompt], return_tensors="pt")
            inputs.append({k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)})
        exit_layer, max_new, lengths = tiny.EXIT_LAYER, 48, (0, 2, 4, 6, 8)
    elif which == "smollm2":
        from fastvlm_kernels.models import smollm2
        model, tokenizer = smollm2.load(torch.float32)
        network = ImitationNetwork.from_pretrained(Path(smollm2.__file__).parent / "imitation", model)
        inputs = [smollm2.chat_inputs(tokenizer, [question]) for question in CHAT]
        exit_layer, max_new, lengths = network.config.exit_layer, 64, (0, 1, 2, 3)
    else:
        raise SystemExit("usage: adaptive.py tiny | smollm2 [repetitions]")
    expected = [model.generate(**i, max_new_tokens=max_new, do_sample=False) for i in inputs]
    decoders = {f"k{k}": SelfSpeculativeDecoder(model, exit_layer, imitation=network, draft_len=k) for k in lengths}
    decoders["adaptive"] = SelfSpeculativeDecoder(model, exit_layer, imitation=network, draft_len="adaptive")
    cost_model = SelfSpeculativeDecoder(model, exit_layer, imitation=network, draft_len="adaptive")
    cost_model.policy = CostModelDraftLen(cost_model.max_draft_len)
    decoders["cost-model"] = cost_model
    for name, decoder in decoders.items():
        for i, want in zip(inputs, expected):
            if not torch.equal(decoder.generate(**i, max_new_tokens=max_new).sequences, want):
                raise SystemExit(f"{name}: output differs from model.generate")
    for repetition in range(repetitions):
        seconds = {}
        for name in (list(decoders) if repetition % 2 else list(decoders)[::-1]):
            start = time.perf_counter()
            for i in inputs:
                decoders[name].generate(**i, max_new_tokens=max_new)
            seconds[name] = time.perf_counter() - start
        best = min(value for name, value in seconds.items() if name.startswith("k"))
        print(f"{which} repetition {repetition + 1}: " + "  ".join(
            f"{name} {value:.2f} s ({value / best:.2f})" for name, value in seconds.items()), flush=True)


if __name__ == "__main__":
    main()
