"""Trains imitation networks for SmolLM2-135M-Instruct on the self-distillation data of
``python/build_smollm2_data.py`` and measures them on its held-out topics.

    python python/train_smollm2_imitation.py --exit-layer 8 --kind layers --steps 600
    python python/train_smollm2_imitation.py --exit-layer 8 --kind layers --steps 600 --resume   # after a stop
    python python/train_smollm2_imitation.py --exit-layer 8 --kind layers --eval-only            # measure again
    python python/train_smollm2_imitation.py --eval-only --network fastvlm_kernels/models/smollm2/imitation \
        --eval-split wild --out build/smollm2_imitation/shipped    # any network, on the held-out wild split
        # (add --eval-vocabs 16384,32768 --snapshot SNAPSHOT: the same network over larger draft vocabularies)
    python python/train_smollm2_imitation.py --summary bench/results/cpu-DATE-smollm2-acceptance   # table + plot
    python python/train_smollm2_imitation.py --export build/smollm2_imitation/ship --network RUN/imitation \
        --export-vocab 16384 --export-dtype bfloat16 --snapshot SNAPSHOT   # another draft vocabulary, bf16 file

Training data: the training prompts answered so far (the data program may still be running): they are
copied into a snapshot folder (``--snapshot``, written once, so a resumed run sees the same data) whose
answers come from the data program's responses cache. The network drafts over the ``--draft-vocab`` most
frequent tokens of those answers (``TrainConfig.draft_vocab``); verification always reads the full vocabulary.
With ``--teacher-cache FOLDER`` the model's outputs over the snapshot are stored once (a resumable build;
``--teacher-exit-layers 4,6,8,12`` stores several exit layers' states, so an exit-layer sweep builds it once)
and every step reads them instead of running the 30 layers, which is most of a step's time.

Measurement (``heldout_acceptance.json`` in the run folder, and printed): on the held-out split (topics never
trained on), the per-token agreement with the full model and the mean accepted tokens per step for draft
lengths 1-8, teacher-forced along the model's own answers (:mod:`fastvlm_kernels.imitation.evaluation`, equal
to the decoder's own count), for the trained network, for plain early exit at the same layer over the full
vocabulary, and for plain early exit over the same draft vocabulary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fastvlm_kernels.imitation import ImitationNetwork, TrainConfig, train_imitation  # noqa: E402
from fastvlm_kernels.imitation.data import Encoder, _read_cache, load_examples  # noqa: E402
from fastvlm_kernels.imitation.evaluation import compare_drafters  # noqa: E402
from fastvlm_kernels.imitation.teacher import model_fingerprint  # noqa: E402

MAX_NEW_TOKENS = 160     # the data program's answer length (part of its responses cache's fingerprint)


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# the data program's training splits (answers in responses/train.jsonl): the topic templates and the other
# sources; never "heldout" or "wild"
TRAIN_SPLITS = ("train", "train_more", "train_topics", "forms", "docstrings", "self_instruct")


def write_snapshot(data: Path, snapshot: Path, model, tokenizer) -> int:
    """Copies the training prompts (of every training split present) that have an answer in the responses cache
    into ``snapshot``; returns how many."""
    fingerprint = dict(model_fingerprint(model), max_new_tokens=MAX_NEW_TOKENS)
    done = _read_cache(data / "responses" / "train.jsonl", fingerprint)
    kept = []
    for split in TRAIN_SPLITS:
        if not (data / split / "prompts.jsonl").is_file():
            continue
        examples = load_examples(data / split)
        lines = [line for line in (data / split / "prompts.jsonl").read_text().splitlines() if line.strip()]
        if len(lines) != len(examples):
            raise RuntimeError(f"{data / split}: {len(lines)} lines but {len(examples)} examples")
        kept += [line for example, line in zip(examples, lines) if example.key in done]
    snapshot.mkdir(parents=True, exist_ok=True)
    temporary = snapshot / "prompts.jsonl.tmp"
    temporary.write_text("\n".join(kept) + "\n")
    temporary.replace(snapshot / "prompts.jsonl")
    return len(kept)


def answered_examples(folder: Path, responses: Path, model) -> list:
    """The examples of ``folder`` that have an answer in the responses cache ``responses``, with it."""
    done = _read_cache(responses, dict(model_fingerprint(model), max_new_tokens=MAX_NEW_TOKENS))
    examples = [example for example in load_examples(folder) if example.key in done]
    for example in examples:
        example.response_ids = done[example.key]
    return examples


def held_out_examples(data: Path, model, tokenizer, limit, split: str = "heldout"):
    examples = answered_examples(data / split, data / "responses" / f"{split}.jsonl", model)
    return examples[:limit] if limit else examples


def measure(model, tokenizer, network: ImitationNetwork, examples, out: Path, split: str = "heldout",
            other_vocabs: Optional[dict] = None) -> dict:
    """``other_vocabs``: ``{size: ids}``, the same network drafting over other draft vocabularies as well
    (``imitation_vocab_<size>``), measured in the same pass."""
    exit_layer = network.config.exit_layer
    drafters = {"imitation": (network, network.draft_vocab), "early_exit": (None, None)}
    if network.draft_vocab is not None:
        drafters["early_exit_draft_vocab"] = (None, network.draft_vocab)
    for size, ids in (other_vocabs or {}).items():
        drafters[f"imitation_vocab_{size}"] = (network, ids)
    start = time.perf_counter()
    profiles = compare_drafters(model, Encoder(tokenizer), examples, exit_layer, drafters,
                                draft_lens=(1, 2, 3, 4, 5, 6, 8), progress=True)
    record = {"exit_layer": exit_layer, "kind": network.config.kind, "num_layers": network.config.num_layers,
              "draft_vocab": network.config.draft_vocab_size, "split": split, "held_out_prompts": len(examples),
              "seconds": round(time.perf_counter() - start, 1),
              "drafters": {name: profile.to_dict() for name, profile in profiles.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / ("heldout_acceptance.json" if split == "heldout" else f"{split}_acceptance.json")).write_text(
        json.dumps(record, indent=2) + "\n")
    for name, profile in profiles.items():
        accepted = " ".join(f"k={k}: {v:.3f}" for k, v in profile.mean_accepted.items())
        say(f"{split} {name:>28}: agreement {profile.agreement:.3f} over {profile.positions} positions | "
            f"accepted per step {accepted}")
    gain = profiles["imitation"].mean_accepted[4] - profiles["early_exit"].mean_accepted[4]
    say(f"k=4: imitation - plain early exit = {gain:+.3f} accepted tokens per step")
    return record


def summarise(runs: Path, prefix: Path) -> None:
    """A markdown table and a plot of every run's held-out acceptance (exit layer x kind x draft length, plain
    early exit beside), from the ``heldout_acceptance.json`` files under ``runs``."""
    records = []
    for path in sorted(runs.glob("*/heldout_acceptance.json")):
        record = json.loads(path.read_text())
        record["run"] = path.parent.name
        records.append(record)
    if not records:
        raise SystemExit(f"no heldout_acceptance.json under {runs}")
    records.sort(key=lambda r: (r["exit_layer"], r["kind"]))
    lengths = list(records[0]["drafters"]["imitation"]["mean_accepted"])
    lines = ["SmolLM2-135M-Instruct, held-out topics: drafted tokens accepted per step (teacher-forced along the "
             "model's own answers), imitation network against plain early exit at the same exit layer", "",
             "| run | E | kind | draft vocab | steps | drafter | agreement | " + " | ".join(f"k={k}" for k in lengths)
             + " |", "|" + "---|" * (7 + len(lengths))]
    for record in records:
        run_json = runs / record["run"] / "run.json"
        steps = json.loads(run_json.read_text())["config"]["steps"] if run_json.exists() else ""
        for name, profile in record["drafters"].items():
            cells = [f"{profile['mean_accepted'][k]:.3f}" for k in lengths]
            lines.append(f"| {record['run']} | {record['exit_layer']} | {record['kind']} | {record['draft_vocab']} | "
                         f"{steps} | {name} | {profile['agreement']:.3f} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{records[0]['held_out_prompts']} held-out prompts; agreement: share of answer positions where the "
                 "drafter's token is the full model's.")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")
    prefix.with_suffix(".json").write_text(json.dumps(records, indent=2) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(8, 5))
    for index, record in enumerate(records):
        color = f"C{index}"
        label = record["run"]
        for name, style in (("imitation", "-"), ("early_exit", ":")):
            values = record["drafters"][name]["mean_accepted"]
            axis.plot([int(k) for k in values], list(values.values()), style, color=color, marker="o",
                      label=f"{label} {'imitation' if name == 'imitation' else 'plain early exit'}")
    axis.set_xlabel("draft length k")
    axis.set_ylabel("drafted tokens accepted per step")
    axis.set_title("SmolLM2-135M-Instruct, held-out topics")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(prefix.with_suffix(".png"), dpi=110)
    print("\n".join(lines))
    print(f"wrote {prefix}.md/.json/.png")


def snapshot_vocabs(model, tokenizer, data: Path, snapshot: Path, sizes) -> dict:
    """``{size: ids}``: the ``size`` most frequent tokens of the answers to ``snapshot``'s prompts, plus EOS (as
    the trainer chooses a run's draft vocabulary), for each of ``sizes`` (the answers read once)."""
    from fastvlm_kernels.decoding.adapters import adapter_for
    from fastvlm_kernels.imitation.trainer import draft_vocab_for
    if not sizes:
        return {}
    examples = answered_examples(snapshot, data / "responses" / "train.jsonl", model)
    if not examples:
        raise SystemExit(f"{snapshot}: no answered prompts in {data / 'responses' / 'train.jsonl'}")
    say(f"draft vocabularies of {', '.join(map(str, sizes))} tokens: the most frequent of {len(examples)} answers "
        f"in {snapshot}")
    return {size: draft_vocab_for(model, adapter_for(model), examples, Encoder(tokenizer), size) for size in sizes}


def export(model, tokenizer, network: ImitationNetwork, data: Path, snapshot: Path, out: Path, vocab_size: int,
           dtype: str) -> None:
    """Writes ``network`` to ``out`` with the ``vocab_size`` most frequent answer tokens of ``snapshot``'s
    prompts as its draft vocabulary (0: its own) and its weights stored as ``dtype``: the draft vocabulary the
    network is trained over need not be the one it drafts over (its states do not depend on it; a larger one
    covers more of the answers, at a larger draft head)."""
    if vocab_size:
        network.set_draft_vocab(snapshot_vocabs(model, tokenizer, data, snapshot, [vocab_size])[vocab_size])
    network.save_pretrained(out, model, dtype=getattr(torch, dtype) if dtype else None)
    size = (out / "model.safetensors").stat().st_size
    say(f"wrote {out} ({size / 1e6:.1f} MB, draft vocabulary {network.config.draft_vocab_size or 'the whole vocabulary'})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("build/smollm2_data"))
    parser.add_argument("--snapshot", type=Path, default=None,
                        help="training prompts folder (default: <data>/train_snapshot; written if missing)")
    parser.add_argument("--refresh-snapshot", action="store_true", help="rewrite the snapshot from the cache")
    parser.add_argument("--out", type=Path, default=None, help="default build/smollm2_imitation/E<E>-<kind>")
    parser.add_argument("--exit-layer", type=int)
    parser.add_argument("--summary", type=Path, help="write the table and plot of every run under --runs to this "
                                                     "prefix (.md, .json, .png) and stop")
    parser.add_argument("--runs", type=Path, default=Path("build/smollm2_imitation"))
    parser.add_argument("--kind", choices=("layers", "mlp"), default="layers")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--init-layer", type=int, default=-1)
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from this saved network's weights (a run's imitation/ folder)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--cosine-weight", type=float, default=1.0)
    parser.add_argument("--kd-weight", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--agreement-weight", type=float, default=0.0,
                        help="weight of the cross-entropy against the full model's greedy token (0: off)")
    parser.add_argument("--draft-vocab", type=int, default=4096)
    parser.add_argument("--inherit-draft-vocab", action="store_true",
                        help="with --init-from: keep that network's own draft vocabulary (--draft-vocab is ignored)")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--heldout-prompts", type=int, default=0, help="0: all")
    parser.add_argument("--teacher-cache", type=Path, default=None,
                        help="store the model's outputs over the training prompts here once (GBs: ~4.6 KB a "
                             "token) and train from them: each step then costs the network's own pass only")
    parser.add_argument("--teacher-exit-layers", type=lambda text: [int(v) for v in text.split(",") if v.strip()],
                        default=None, help="comma-separated: the exit layers a new teacher cache stores (include "
                                           "--exit-layer; each costs ~2.3 KB a token)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--eval-only", action="store_true", help="measure the run's saved network only")
    parser.add_argument("--eval-split", default="heldout", choices=("heldout", "wild"),
                        help="the held-out split measured on (wild: the persona x goal grammar no training uses)")
    parser.add_argument("--network", type=Path, default=None,
                        help="--eval-only: measure this saved network (its own exit layer) instead of the run's")
    parser.add_argument("--export", type=Path, default=None,
                        help="write --network to this folder (with --export-vocab, --export-dtype) and stop")
    parser.add_argument("--export-vocab", type=int, default=0,
                        help="--export: draft over the N most frequent answer tokens of --snapshot (0: keep its own)")
    parser.add_argument("--export-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="--export: store the weights in this type (default: as they are)")
    parser.add_argument("--eval-vocabs", type=lambda text: [int(v) for v in text.split(",") if v.strip()],
                        default=[], help="comma-separated sizes: also measure the network drafting over the N most "
                                         "frequent answer tokens of --snapshot (its states do not depend on it)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.eval_vocabs and args.snapshot is None:
        parser.error("--eval-vocabs needs --snapshot (whose answers give the token counts)")
    if args.export is not None and (args.network is None or (args.export_vocab and args.snapshot is None)):
        parser.error("--export needs --network (and --snapshot with --export-vocab)")
    if args.summary:
        summarise(args.runs, args.summary)
        return
    if args.exit_layer is None and args.network is None:
        parser.error("--exit-layer is required (or --summary, or --eval-only --network)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from fastvlm_kernels.models import smollm2
    model, tokenizer = smollm2.load()
    model.eval()
    if args.export is not None:
        export(model, tokenizer, ImitationNetwork.from_pretrained(args.network, model), args.data, args.snapshot,
               args.export, args.export_vocab, args.export_dtype)
        return
    out = args.out or Path("build/smollm2_imitation") / f"E{args.exit_layer}-{args.kind}"
    if args.network is not None and not args.eval_only:
        parser.error("--network is for --eval-only and --export")
    if not args.eval_only:
        snapshot = args.snapshot or args.data / "train_snapshot"
        if args.refresh_snapshot or not (snapshot / "prompts.jsonl").exists():
            count = write_snapshot(args.data, snapshot, model, tokenizer)
            say(f"snapshot {snapshot}: {count} answered training prompts")
        config = TrainConfig(exit_layer=args.exit_layer, kind=args.kind, layers=args.layers,
                             init_layer=args.init_layer if args.kind == "layers" else None,
                             init_from=str(args.init_from) if args.init_from else None, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                             cosine_weight=args.cosine_weight, kd_weight=args.kd_weight,
                             temperature=args.temperature, agreement_weight=args.agreement_weight,
                             draft_vocab=0 if args.inherit_draft_vocab else args.draft_vocab,
                             inherit_draft_vocab=args.inherit_draft_vocab,
                             max_new_tokens=MAX_NEW_TOKENS, eval_every=args.eval_every, eval_fraction=0.02,
                             max_eval_examples=8, eval_max_new_tokens=48, checkpoint_every=50,
                             raw_prompts=True)   # the snapshot's prompts are already in the chat template
        result = train_imitation(model, tokenizer, snapshot, out, config, resume=args.resume,
                                 overwrite=args.overwrite, responses_cache=args.data / "responses" / "train.jsonl",
                                 teacher_cache=args.teacher_cache, teacher_exit_layers=args.teacher_exit_layers)
        network = result.network
    else:
        network = ImitationNetwork.from_pretrained(args.network or out / "imitation", model)
    other_vocabs = snapshot_vocabs(model, tokenizer, args.data, args.snapshot, args.eval_vocabs)
    measure(model, tokenizer, network, held_out_examples(args.data, model, tokenizer, args.heldout_prompts,
                                                         args.eval_split), out, args.eval_split, other_vocabs)


if __name__ == "__main__":
    main()
