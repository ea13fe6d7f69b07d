"""The trainer: teacher values, a learnable run, a frozen backbone, resume, the output folder's rules."""
from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from fastvlm_kernels.decoding import SelfSpeculativeDecoder
from fastvlm_kernels.decoding.adapters import adapter_for
from fastvlm_kernels.imitation import ImitationNetwork, TrainConfig, train_imitation
from fastvlm_kernels.imitation.data import Encoder, TrainBatch
from fastvlm_kernels.imitation.teacher import Taps, teacher_forward
from tests.decoding.models import FAMILIES, NUM_LAYERS, build, sharpen

from .helpers import llava_processor, tokenizer, write_image, write_prompts

LEARNABLE = TrainConfig(exit_layer=2, steps=30, batch_size=8, lr=2e-3, warmup_steps=3, eval_every=15,
                        eval_max_new_tokens=12, max_new_tokens=10, eval_fraction=0.2, max_eval_examples=4,
                        checkpoint_every=10)


@pytest.fixture(scope="module")
def reference_outputs():
    """family -> (case, the model's own outputs with hidden states), built once per family for the module."""
    built = {}

    def get(family):
        if family not in built:
            case = build(family, seed=0, batch=2)
            with torch.no_grad():
                built[family] = case, case.model(**case.inputs, output_hidden_states=True)
        return built[family]

    return get


@pytest.mark.parametrize("exit_layer, target_layer", [(1, 3), (2, NUM_LAYERS)], ids=["E1-T3", "E2-last"])
@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_values_are_the_models_own(reference_outputs, family, exit_layer, target_layer):
    """Layer-E states, target states and logits taken by the hooks equal the model's own hidden states and
    logits (on real positions of left-padded rows, images included); the last layer's target is pre-norm."""
    case, reference = reference_outputs(family)
    adapter = adapter_for(case.model)
    mask = case.inputs["attention_mask"].bool()
    batch = TrainBatch(dict(case.inputs), mask)
    teacher = teacher_forward(adapter, Taps(adapter.layers, exit_layer, target_layer), batch)
    torch.testing.assert_close(teacher.exit_states[mask], reference.hidden_states[exit_layer][mask])
    if target_layer < NUM_LAYERS:
        torch.testing.assert_close(teacher.targets, reference.hidden_states[target_layer][mask])
    else:   # hidden_states[-1] is already normed; the target is the layer's own output
        torch.testing.assert_close(adapter.norm(teacher.targets), reference.hidden_states[-1][mask])
    torch.testing.assert_close(teacher.logits, reference.logits[mask].float())
    assert teacher.position_embeddings[0].shape[-2] == mask.shape[1]


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """A short fixed-seed run on a tiny Llama whose deep layers add little (sharpened), on prompts whose
    responses the model itself generates."""
    root = tmp_path_factory.mktemp("learnable")
    case = build("llama", seed=2)
    sharpen(case.model, 2, scale=0.5)
    write_prompts(root / "data", 20, seed=0)
    before = {name: tensor.clone() for name, tensor in case.model.state_dict().items()}
    seen = []

    def callback(step, logs):
        seen.append((any(p.requires_grad for p in case.model.parameters()),
                     any(p.grad is not None for p in case.model.parameters())))

    result = train_imitation(case.model, tokenizer(), root / "data", root / "out", LEARNABLE, progress=False,
                             callback=callback)
    return SimpleNamespace(case=case, result=result, before=before, seen=seen, root=root)


def test_training_drives_cosine_loss_down_and_accepted_length_up(learnable):
    result = learnable.result
    cosine = [entry["cosine"] for entry in result.history]
    assert len(cosine) == LEARNABLE.steps
    assert sum(cosine[-3:]) / 3 < 0.2 * sum(cosine[:3]) / 3, cosine
    assert [e.step for e in result.evals] == [0, 15, 30]
    start, end = result.evals[0].mean_accepted, result.evals[-1].mean_accepted
    assert end > start + 0.5, (start, end)
    assert end > result.baseline.mean_accepted + 0.5, (result.baseline.mean_accepted, end)
    assert all(entry["lr"] > 0 for entry in result.history)
    peak = max(entry["lr"] for entry in result.history)
    assert peak == pytest.approx(LEARNABLE.lr) and result.history[-1]["lr"] < 0.2 * peak   # warmup then decay


def test_backbone_is_frozen_and_bit_identical(learnable):
    model = learnable.case.model
    assert learnable.seen and not any(flag for flags in learnable.seen for flag in flags)   # no requires_grad, no grad
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, learnable.before[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())   # the caller's flags are restored


def test_outputs_and_the_saved_network_drafts_losslessly(learnable):
    out = learnable.root / "out"
    for name in ("run.json", "checkpoint.pt", "history.json", "responses.jsonl", "imitation/config.json",
                 "imitation/model.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((out / "history.json").read_text())
    assert len(history["steps"]) == LEARNABLE.steps
    assert history["baseline"]["mean_accepted"] == pytest.approx(learnable.result.baseline.mean_accepted)
    model = learnable.case.model
    loaded = ImitationNetwork.from_pretrained(out / "imitation", model)
    for (name, a), (_, b) in zip(learnable.result.network.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    encoder = Encoder(tokenizer())
    decoder = SelfSpeculativeDecoder(model, exit_layer=2, imitation=loaded, draft_len=4)
    accepted = []
    for example in learnable.result.held_out:
        inputs = encoder.prompt_inputs(example)
        got = decoder.generate(**inputs, max_new_tokens=12)
        assert torch.equal(got.sequences, model.generate(**inputs, max_new_tokens=12, do_sample=False))
        accepted.extend(a for row in got.stats.accepted for a in row)
    assert sum(accepted) / len(accepted) == pytest.approx(learnable.result.final.mean_accepted)


@pytest.mark.parametrize("kind", ["layers", "mlp"])
def test_resume_gives_the_uninterrupted_result(tmp_path, kind):
    case = build("llama", seed=3)
    write_prompts(tmp_path / "data", 12, seed=4, responses=True)
    config = TrainConfig(exit_layer=1, steps=6, batch_size=4, lr=1e-3, warmup_steps=2, eval_fraction=0.0,
                         checkpoint_every=0, kind=kind, init_layer=None, seed=7)
    whole = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "whole", config, progress=False)
    first = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "parts", config, progress=False,
                            stop_after=3)
    assert len(first.history) == 3 and not (tmp_path / "parts" / "imitation").exists()
    rest = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "parts", config, progress=False,
                           resume=True)
    assert rest.history == whole.history
    for (name, a), (_, b) in zip(whole.network.state_dict().items(), rest.network.state_dict().items()):
        assert torch.equal(a, b), name
    assert whole.history[-1]["loss"] < whole.history[0]["loss"]


def test_output_folder_rules(tmp_path):
    case = build("llama", seed=3)
    write_prompts(tmp_path / "data", 6, seed=4, responses=True)
    config = TrainConfig(exit_layer=1, steps=1, batch_size=2, eval_fraction=0.0)
    run = lambda config, **options: train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "out",
                                                    config, progress=False, **options)
    run(config)
    with pytest.raises(ValueError, match="already holds this run; pass --resume"):
        run(config)
    run(config, resume=True)   # a finished run resumes to its end
    with pytest.raises(ValueError, match=r"already holds a different run \(config.exit_layer: 1 there, 2 here"):
        run(replace(config, exit_layer=2), resume=True)
    with pytest.raises(ValueError, match="not both"):
        run(config, resume=True, overwrite=True)
    other = replace(config, exit_layer=2, kind="mlp")
    run(other, overwrite=True)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["config"]["kind"] == "mlp"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no imitation run"):
        train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "foreign", config, progress=False)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_layer_choices_are_checked():
    case = build("llama", seed=0)
    base = TrainConfig(exit_layer=2, steps=1)
    with pytest.raises(ValueError, match="exit_layer=3 must be below target_layer=3"):
        train_imitation(case.model, tokenizer(), "unused", "unused", replace(base, exit_layer=3, target_layer=3))
    with pytest.raises(ValueError, match=r"exit_layer=4 is out of range: this model has 4 decoder layers \(valid: 1..3\)"):
        train_imitation(case.model, tokenizer(), "unused", "unused", replace(base, exit_layer=4))
    with pytest.raises(ValueError, match="target_layer=5 is out of range"):
        train_imitation(case.model, tokenizer(), "unused", "unused", replace(base, target_layer=5))


def test_a_vlm_trains_on_images_and_text(tmp_path):
    """LLaVA with its processor: image lines and a text-only line, responses generated by the model."""
    case = build("llava", seed=1)
    sharpen(case.model, 2, scale=0.5)
    data = tmp_path / "data"
    lines = []
    for i in range(4):
        write_image(data / f"img{i}.png", i)
        lines.append({"prompt": f"w{5 + i} <image> w{9 + i}", "image": f"img{i}.png"})
    lines.append({"prompt": "w30 w31 w32"})
    (data / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = TrainConfig(exit_layer=2, target_layer=3, steps=3, batch_size=3, lr=1e-3, warmup_steps=1,
                         eval_fraction=0.2, eval_max_new_tokens=6, max_new_tokens=6, draft_len=3)
    result = train_imitation(case.model, llava_processor(), data, tmp_path / "out", config, progress=False)
    assert len(result.history) == 3 and all(torch.isfinite(torch.tensor(e["loss"])) for e in result.history)
    assert len(result.held_out) == 1 and result.final.steps > 0
    responses = (tmp_path / "out" / "responses.jsonl").read_text().splitlines()
    assert len(responses) == 1 + 4   # header + the training examples' answers


def test_a_draft_vocabulary_is_trained_saved_and_drafted_over(tmp_path):
    """draft_vocab=S: the network records the S most frequent answer tokens (plus EOS), distils over them only
    (the teacher's logits are [M, S]), saves and loads them, and the decoder drafts over them by default,
    losslessly."""
    case = build("llama", seed=3)
    write_prompts(tmp_path / "data", 12, seed=4, responses=True)
    size = 24
    config = TrainConfig(exit_layer=1, steps=4, batch_size=4, lr=1e-3, warmup_steps=1, eval_fraction=0.0,
                         checkpoint_every=0, seed=5, draft_vocab=size)
    result = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "out", config, progress=False)
    encoder = Encoder(tokenizer())
    from fastvlm_kernels.imitation.data import load_examples
    examples = load_examples(tmp_path / "data")
    counts = torch.bincount(torch.tensor([t for e in examples for t in encoder.response_ids(e)]),
                            minlength=case.model.config.vocab_size)
    ids = result.network.draft_vocab
    eos = case.model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    expected = torch.unique(torch.cat([torch.sort(-counts, stable=True).indices[:size], torch.tensor(eos)]))
    assert torch.equal(ids.cpu(), expected)
    assert result.network.config.draft_vocab_size == ids.numel()
    loaded = ImitationNetwork.from_pretrained(tmp_path / "out" / "imitation", case.model)
    assert torch.equal(loaded.draft_vocab.cpu(), ids.cpu())
    for (name, a), (_, b) in zip(result.network.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, imitation=loaded, draft_len=3)
    assert torch.equal(decoder.draft_vocab.cpu(), ids.cpu())
    inputs = encoder.prompt_inputs(examples[0])
    got = decoder.generate(**inputs, max_new_tokens=10)
    assert torch.equal(got.sequences, case.model.generate(**inputs, max_new_tokens=10, do_sample=False))
    # the teacher's distribution is over the subset's ids
    adapter = adapter_for(case.model)
    batch = encoder.collate(examples[:2])
    full = teacher_forward(adapter, Taps(adapter.layers, 1, NUM_LAYERS), batch)
    subset = teacher_forward(adapter, Taps(adapter.layers, 1, NUM_LAYERS), batch, ids)
    torch.testing.assert_close(subset.logits, full.logits[:, ids])
    with pytest.raises(ValueError, match="draft_vocab"):
        TrainConfig(exit_layer=1, draft_vocab=-1).check(NUM_LAYERS)


def test_the_agreement_term_trains_the_draft_toward_the_greedy_token(tmp_path):
    """agreement_weight alone (no cosine, no distillation): the draft's cross-entropy against the full model's
    greedy token is logged each step and falls; the run records the weight, and a run recorded before the term
    existed (no agreement_weight in its record) still resumes as one that ran without it."""
    case = build("llama", seed=3)
    write_prompts(tmp_path / "data", 12, seed=4, responses=True)
    config = TrainConfig(exit_layer=1, steps=16, batch_size=4, lr=3e-3, warmup_steps=1, eval_fraction=0.0,
                         checkpoint_every=8, seed=5, draft_vocab=24, cosine_weight=0.0, kd_weight=0.0,
                         agreement_weight=1.0)
    result = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "out", config, progress=False)
    agreement = [entry["agreement"] for entry in result.history]
    assert len(agreement) == 16 and all(value > 0 for value in agreement)
    assert sum(agreement[-4:]) < 0.7 * sum(agreement[:4]), agreement
    assert all(entry["loss"] == pytest.approx(entry["agreement"]) for entry in result.history)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["config"]["agreement_weight"] == 1.0
    # a run without the term, recorded before it existed, resumes (its record is read as agreement_weight 0)
    old = replace(config, steps=4, cosine_weight=1.0, kd_weight=1.0, agreement_weight=0.0)
    train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "old", old, progress=False)
    record = json.loads((tmp_path / "old" / "run.json").read_text())
    assert record["config"].pop("agreement_weight") == 0.0
    (tmp_path / "old" / "run.json").write_text(json.dumps(record))
    resumed = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "old", old, progress=False,
                              resume=True)
    assert len(resumed.history) == 4 and all(entry["agreement"] == 0.0 for entry in resumed.history)
    with pytest.raises(ValueError, match="different run"):
        train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "old", replace(config, steps=4),
                        progress=False, resume=True)


def test_init_from_starts_at_a_saved_networks_weights(tmp_path):
    """init_from: the run's network starts as the saved one (fine-tuning on more data), chooses its own draft
    vocabulary, and a saved network of another shape or a folder without one is refused, naming init_from."""
    case = build("llama", seed=3)
    write_prompts(tmp_path / "data", 12, seed=4, responses=True)
    config = TrainConfig(exit_layer=1, steps=3, batch_size=4, lr=1e-3, warmup_steps=1, eval_fraction=0.0,
                         checkpoint_every=0, seed=5, draft_vocab=24)
    first = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "first", config, progress=False)
    saved = tmp_path / "first" / "imitation"
    tuned = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "tuned",
                            replace(config, steps=1, lr=1e-12, weight_decay=0.0, draft_vocab=16,
                                    init_from=str(saved)), progress=False)
    for (name, a), (_, b) in zip(first.network.state_dict().items(), tuned.network.state_dict().items()):
        if name != "_draft_vocab":
            assert torch.allclose(a, b, atol=1e-8), name
    assert tuned.network.draft_vocab.numel() < first.network.draft_vocab.numel()
    fresh = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "fresh",
                            replace(config, steps=1, lr=1e-12, weight_decay=0.0), progress=False)
    assert fresh.history[0]["loss"] > tuned.history[0]["loss"]
    # inherit_draft_vocab: the saved network's own vocabulary, not one chosen from this run's data (with
    # draft_vocab=0 and no inheriting, the run would draft over the whole vocabulary)
    kept = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "kept",
                           replace(config, steps=1, draft_vocab=0, inherit_draft_vocab=True, init_from=str(saved)),
                           progress=False)
    assert torch.equal(kept.network.draft_vocab.cpu(), first.network.draft_vocab.cpu())
    assert json.loads((tmp_path / "kept" / "run.json").read_text())["config"]["inherit_draft_vocab"] is True
    for bad in (dict(inherit_draft_vocab=True), dict(inherit_draft_vocab=True, init_from=str(saved))):
        with pytest.raises(ValueError, match="inherit_draft_vocab=True keeps init_from's draft vocabulary"):
            replace(config, **bad).check(NUM_LAYERS)
    whole = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "whole",
                            replace(config, steps=1, draft_vocab=0), progress=False)
    with pytest.raises(ValueError, match="init_from=.* drafts over the whole vocabulary"):
        train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "none",
                        replace(config, steps=1, draft_vocab=0, inherit_draft_vocab=True,
                                init_from=str(tmp_path / "whole" / "imitation")), progress=False)
    assert whole.network.draft_vocab is None
    with pytest.raises(ValueError, match="init_from=.* holds a network with kind='layers', this run builds kind='mlp'"):
        train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "other",
                        replace(config, kind="mlp", init_layer=None, init_from=str(saved)), progress=False)
    with pytest.raises(ValueError, match="init_from=.* holds no saved imitation network"):
        train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "other",
                        replace(config, init_from=str(tmp_path / "data")), progress=False)


def test_init_from_grows_a_network_by_identity_layers(tmp_path):
    """init_from with fewer layers than the run builds: the saved layers come first, each added layer starts as
    the identity (so the first step's loss is the saved network's), and only the added layers' output
    projections start at zero; a saved network of more layers than the run builds is refused, naming init_from."""
    case = build("llama", seed=3)
    write_prompts(tmp_path / "data", 12, seed=4, responses=True)
    config = TrainConfig(exit_layer=1, steps=3, batch_size=4, lr=1e-3, warmup_steps=1, eval_fraction=0.0,
                         checkpoint_every=0, seed=5, draft_vocab=24)
    train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "first", config, progress=False)
    saved = tmp_path / "first" / "imitation"
    again = replace(config, steps=1, lr=1e-12, weight_decay=0.0, init_from=str(saved))
    same = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "same", again, progress=False)
    grown = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "grown", replace(again, layers=3),
                            progress=False)
    assert grown.network.config.num_layers == 3
    assert grown.history[0]["loss"] == pytest.approx(same.history[0]["loss"], rel=1e-5)
    kept = {name: tensor for name, tensor in same.network.state_dict().items() if name.startswith("layers.0.")}
    for name, tensor in kept.items():
        assert torch.allclose(grown.network.state_dict()[name], tensor, atol=1e-8), name
    for layer in grown.network.layers[1:]:
        assert layer.self_attn.o_proj.weight.abs().max() < 1e-6 and layer.mlp.down_proj.weight.abs().max() < 1e-6
        assert layer.self_attn.q_proj.weight.abs().max() > 0       # the rest is a real layer, not zeros
    with pytest.raises(ValueError, match="init_from=.* num_layers=3, this run builds num_layers=1"):
        train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "shrunk",
                        replace(again, init_from=str(tmp_path / "grown" / "imitation")), progress=False)


def test_a_network_saved_in_bfloat16_loads_rounded_into_the_models_dtype(tmp_path):
    """save_pretrained(dtype=torch.bfloat16): the file holds bf16 weights (and the int64 draft vocabulary as it
    was), from_pretrained loads them as the model's fp32 equal to the rounded weights, and the decoder with the
    loaded network stays lossless; a dtype that is not a floating-point torch.dtype is refused, naming dtype."""
    from safetensors.torch import load_file
    case = build("llama", seed=3)
    write_prompts(tmp_path / "data", 12, seed=4, responses=True)
    config = TrainConfig(exit_layer=1, layers=2, steps=2, batch_size=4, lr=1e-3, warmup_steps=1, eval_fraction=0.0,
                         checkpoint_every=0, seed=5, draft_vocab=24)
    network = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "out", config,
                              progress=False).network
    network.save_pretrained(tmp_path / "bf16", case.model, dtype=torch.bfloat16)
    stored = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert stored["_draft_vocab"].dtype == torch.int64 and torch.equal(stored["_draft_vocab"], network.draft_vocab)
    assert {t.dtype for name, t in stored.items() if name != "_draft_vocab"} == {torch.bfloat16}
    loaded = ImitationNetwork.from_pretrained(tmp_path / "bf16", case.model)
    for name, tensor in network.state_dict().items():
        got = loaded.state_dict()[name]
        want = tensor if name == "_draft_vocab" else tensor.to(torch.bfloat16).to(tensor.dtype)
        assert got.dtype == tensor.dtype and torch.equal(got, want), name
    encoder = Encoder(tokenizer())
    from fastvlm_kernels.imitation.data import load_examples
    inputs = encoder.prompt_inputs(load_examples(tmp_path / "data")[0])
    decoder = SelfSpeculativeDecoder(case.model, exit_layer=1, imitation=loaded, draft_len=3)
    assert torch.equal(decoder.generate(**inputs, max_new_tokens=10).sequences,
                       case.model.generate(**inputs, max_new_tokens=10, do_sample=False))
    with pytest.raises(TypeError, match="dtype"):
        network.save_pretrained(tmp_path / "bad", case.model, dtype=torch.int8)


@pytest.mark.parametrize("steps, given, used", [(20, None, 2), (5, None, 1), (499, None, 49), (500, None, 50),
                                                (3000, None, 50), (20, 7, 7), (20, 0, 0)],
                         ids=lambda value: str(value))
def test_the_warmup_is_a_tenth_of_a_short_run_unless_given(steps, given, used):
    assert TrainConfig(exit_layer=1, steps=steps, warmup_steps=given).check(NUM_LAYERS).warmup_steps == used


def test_a_short_run_reaches_its_rate_and_a_long_given_warmup_is_warned_about(tmp_path, capsys):
    case = build("llama", seed=3)
    write_prompts(tmp_path / "data", 6, seed=4, responses=True)
    config = TrainConfig(exit_layer=1, steps=10, batch_size=2, lr=1e-3, eval_fraction=0.0, checkpoint_every=0)
    result = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "auto", config, progress=False)
    rates = [entry["lr"] for entry in result.history]
    assert result.config.warmup_steps == 1 and max(rates) == pytest.approx(config.lr) and rates[1] == max(rates)
    assert "warm-up" not in capsys.readouterr().err
    given = replace(config, warmup_steps=50)
    result = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "given", given, progress=False)
    assert result.config.warmup_steps == 50 and max(entry["lr"] for entry in result.history) < config.lr / 4
    err = capsys.readouterr().err
    assert "warning: the warm-up (50 steps) is not shorter than the run (10 steps)" in err


def test_the_time_left_is_estimated_from_training_steps_alone(tmp_path, monkeypatch):
    """The progress bar (whose rate gives the time left) starts after the initial evaluation, and every
    evaluation during the run is taken out of its clock."""
    import tqdm.auto
    from fastvlm_kernels.imitation import trainer as trainer_module
    events = []
    real_evaluate, real_tqdm = trainer_module.evaluate, tqdm.auto.tqdm

    class RecordingBar(real_tqdm):
        def __init__(self, *args, **kwargs):
            if kwargs.get("desc") == "imitation":
                events.append("bar")
            super().__init__(*args, **kwargs)

        def unpause(self):
            events.append("unpause")
            super().unpause()

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    monkeypatch.setattr(trainer_module, "evaluate", lambda *args, **kwargs: events.append("eval") or
                        real_evaluate(*args, **kwargs))
    case = build("llama", seed=3)
    write_prompts(tmp_path / "data", 8, seed=4, responses=True)
    config = TrainConfig(exit_layer=1, steps=4, batch_size=2, eval_every=2, eval_fraction=0.25,
                         eval_max_new_tokens=3, checkpoint_every=0)
    train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "out", config, progress=True)
    # baseline and network at step 0, then the bar; the step-2 evaluation, then the bar's clock resumes
    assert events == ["eval", "eval", "bar", "eval", "unpause", "eval"]
