"""The embedded tiny VLM: scenes and their answers, tokenizer, processor + model, the training recipe (at
toy scale), and the shipped model (skipped while its weights are not built)."""
from __future__ import annotations

import math
import re

import pytest
import torch
from PIL import Image

from fastvlm_kernels.models import tiny
from fastvlm_kernels.models.tiny import scenes
from ..helpers import load_program

recipe = load_program("tiny_vlm_recipe")

SEEDS = range(0, 400, 7)


def _number(word: str) -> int:
    return scenes.NUMBERS.index(word)


def _phrases(listing: str) -> list:
    """'a small x, a large y and a small z' -> the three phrases."""
    parts = listing.split(", ")
    return parts[:-1] + parts[-1].split(" and ")


# ---- scenes --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 5, 123456])
def test_scene_is_deterministic_from_its_seed(seed):
    first, second = scenes.make_scene(seed), scenes.make_scene(seed)
    assert first == second
    assert scenes.render(first).tobytes() == scenes.render(second).tobytes()
    assert scenes.make_turn(first, seed) == scenes.make_turn(second, seed)
    image, prompt = tiny.scene(seed)
    image_again, prompt_again = tiny.scene(seed)
    assert image.tobytes() == image_again.tobytes() and prompt == prompt_again
    assert isinstance(image, Image.Image) and image.size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
    assert prompt.startswith("USER: <image> ") and prompt.endswith(" ASSISTANT:")
    other = tiny.scene(seed + 1)[0]
    assert other.tobytes() != image.tobytes()


def test_scenes_vary_and_respect_their_invariants():
    counts, kinds = set(), set()
    for seed in range(300):
        scene = scenes.make_scene(seed)
        counts.add(len(scene.shapes))
        kinds.update(shape.kind for shape in scene.shapes)
        cells = [(shape.row, shape.column) for shape in scene.shapes]
        assert len(set(cells)) == len(cells), "two shapes share a cell"
        names = [shape.name for shape in scene.shapes]
        assert len(set(names)) == len(names), "a colour-and-kind pair is not unique"
        assert cells == sorted(cells), "shapes are not in reading order"
    assert counts == {1, 2, 3, 4, 5}
    assert kinds == set(scenes.KINDS)


@pytest.mark.parametrize("seed", list(SEEDS)[:20])
def test_pixels_match_the_ground_truth(seed):
    """Each shape's colour is painted where the scene says it is: at the centre of a solid shape, on some
    row through the centre of a striped one, on the outline of a hollow one (whose centre is background)."""
    scene = scenes.make_scene(seed)
    image = scenes.render(scene)
    for shape in scene.shapes:
        colour = scenes.COLOURS[shape.colour]
        cx, cy = (int(v) for v in shape.centre)
        pixels = {image.getpixel((cx, y)) for y in range(cy - 3, cy + 4)}
        if shape.texture == "hollow":
            assert image.getpixel((cx, cy)) == scene.background
            radius = scenes.SIZES[shape.size]
            column = {image.getpixel((cx, y)) for y in range(max(0, cy - radius - 1), min(scenes.IMAGE_SIZE, cy + radius + 2))}
            assert colour in column
        else:
            assert colour in pixels


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", scenes.QUESTION_KINDS)
def test_answers_are_computed_from_the_ground_truth(kind, seed):
    scene = scenes.make_scene(seed)
    shapes = scene.shapes
    turn = scenes.make_turn(scene, seed, kind)
    question, answer = turn.question, turn.answer
    assert turn.kind == kind and answer.endswith(".")
    if kind == "describe":
        head, listing = answer[:-1].split(": ")
        expected = "one" if len(shapes) == 1 else scenes.NUMBERS[len(shapes)]
        assert head.split()[2] == expected
        described = _phrases(listing)
        assert described == [f"{s.phrase} {scenes.at_position(s.row, s.column)}" for s in shapes]
    elif kind in ("count_all", "count_colour", "count_kind"):
        count = _number(answer.split()[2])
        if kind == "count_all":
            assert count == len(shapes)
        elif kind == "count_colour":
            colour = next(c for c in scenes.COLOURS if c in re.findall(r"\w+", question))
            assert count == sum(s.colour == colour for s in shapes)
        else:
            shape_kind = next(k for k in scenes.KINDS if scenes.PLURALS[k] in question)
            assert count == sum(s.kind == shape_kind for s in shapes)
    elif kind == "where":
        target = next(s for s in shapes if s.name in question)
        assert answer == f"the {target.name} is {scenes.at_position(target.row, target.column)}."
    elif kind == "what_at":
        found = [s for s in shapes if scenes.at_position(s.row, s.column) in question]
        where = re.search(r"(at the [a-z ]+|in the center)\?$", question).group(1)
        assert answer == (f"{found[0].phrase}." if found else f"there is nothing {where}.")
    elif kind == "relation":
        match = re.match(r"what is (left of|right of|above|below) the (\w+ \w+)\?", question)
        relation, name = match.groups()
        target = next(s for s in shapes if s.name == name)
        # Independently of scenes.related: compare pixel centres, a whole cell apart.
        axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[relation]
        expected = [s.phrase for s in shapes
                    if (s.centre[axis] - target.centre[axis]) * sign > scenes.CELL / 2]
        if expected:
            listing = answer.rsplit(f" {relation} the ", 1)[0].rsplit(" ", 1)[0]
            assert _phrases(listing) == expected
        else:
            assert answer == f"nothing is {relation} the {name}."
    elif kind == "exists":
        colour, shape_kind = question[len("is there a "):-1].split()
        present = [s for s in shapes if (s.colour, s.kind) == (colour, shape_kind)]
        assert answer.startswith("yes") == bool(present)
        if present:
            assert answer.endswith(f"{scenes.at_position(present[0].row, present[0].column)}.")
    elif kind == "colour_of":
        target = next(s for s in shapes if f"the {s.kind} {scenes.at_position(s.row, s.column)}" in question)
        assert answer.endswith(f" is {target.colour}.")
    elif kind == "attributes":
        target = next(s for s in shapes if s.name in question)
        assert answer == f"the {target.name} is {target.size} and {target.texture}."


# ---- tokenizer and processor ---------------------------------------------------------------------------------

def test_tokenizer_round_trip_and_reload(tmp_path):
    tokenizer = recipe.build_tokenizer()
    unk = tokenizer.unk_token_id
    texts = []
    for seed in range(120):
        scene = scenes.make_scene(seed)
        for kind in scenes.QUESTION_KINDS:
            turn = scenes.make_turn(scene, seed, kind)
            texts += [turn.question, turn.answer, recipe.prompt_for(turn.question).lower()]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert unk not in ids, f"unknown word in {text!r}"
        assert tokenizer.decode(ids, skip_special_tokens=True) == text.replace("<image> ", "")
    assert tokenizer("<image>", add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids("<image>")]
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in texts[:50]:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]


@pytest.fixture(scope="module")
def toy():
    config = recipe.reduced()
    processor = recipe.build_processor(config)
    return config, processor, recipe.build_model(config, processor).eval()


def test_processor_expands_the_image_token_to_the_model_features(toy):
    config, processor, model = toy
    images, prompts = zip(*(tiny.scene(seed) for seed in (0, 1)))
    prompts = (prompts[0], recipe.prompt_for("describe the image."))
    inputs = processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)
    image_token = model.config.image_token_id
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    features = getattr(features, "pooler_output", features)
    per_image = features[0].shape[0] if isinstance(features, (list, tuple)) else features.shape[1]
    assert per_image == recipe.num_image_tokens(config) == 9
    assert ((inputs["input_ids"] == image_token).sum(1) == per_image).all()
    assert inputs["attention_mask"][1, 0] == 0 and inputs["input_ids"][1, 0] == processor.tokenizer.pad_token_id
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer))
    assert torch.isfinite(logits).all()


def test_chat_template_gives_the_prompt_format(toy):
    _, processor, _ = toy
    question = "what is left of the red circle?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == recipe.prompt_for(question)


def test_training_batches_mask_everything_but_the_answer(toy):
    config, processor, _ = toy
    indices = recipe.batch_indices(config, processor.tokenizer, 3)
    assert len(indices) == config.batch_size
    all_indices = [i for step in range(recipe.BUCKET_STEPS)
                   for i in recipe.batch_indices(config, processor.tokenizer, step)]
    assert sorted(all_indices) == list(range(recipe.BUCKET_STEPS * config.batch_size))
    batch = recipe.encode_batch(processor, indices[:3])
    tokenizer = processor.tokenizer
    for row, index in enumerate(indices[:3]):
        _, _, answer = recipe.example(index)
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labelled[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(labelled, skip_special_tokens=True) == answer


# ---- training ------------------------------------------------------------------------------------------------

def test_short_training_lowers_the_loss_resumes_exactly_and_decodes_losslessly(tmp_path):
    """30 steps of a reduced model: both losses fall; a run stopped at step 12 and resumed ends with the same
    weights as an uninterrupted one; the written model loads with tiny.load and the decoder reproduces
    model.generate on it."""
    from safetensors.torch import load_file

    from fastvlm_kernels import SelfSpeculativeDecoder

    config = recipe.reduced(steps=30)
    quiet = dict(eval_every=10, print_fn=lambda line: None)
    summary = recipe.train(config, tmp_path / "a", tmp_path / "work-a", **quiet)
    first, last = summary["log"][0], summary["log"][-1]
    assert last["eval_loss"] < first["eval_loss"] - 1.0
    assert last["eval_exit_loss"] < first["eval_exit_loss"] - 1.0
    # every eval also scores the answers with each row given another row's image: a finite loss, not the same one
    assert all(math.isfinite(entry["eval_loss_shuffled_images"]) and
               entry["eval_loss_shuffled_images"] != entry["eval_loss"] for entry in summary["log"])
    assert last["eval_probe_accuracy"] > first["eval_probe_accuracy"] + 0.05

    assert recipe.train(config, tmp_path / "b", tmp_path / "work-b", stop_after=12, **quiet) is None
    assert not (tmp_path / "b").exists()
    recipe.train(config, tmp_path / "b", tmp_path / "work-b", **quiet)
    weights_a = load_file(str(tmp_path / "a" / "model.safetensors"))
    weights_b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)

    model, processor = tiny.load(tmp_path / "a")
    for seed in (0, 1):
        image, prompt = tiny.scene(seed, kind="describe")
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        expected = model.generate(**inputs, max_new_tokens=24)
        for draft_len in (3, "adaptive"):
            out = SelfSpeculativeDecoder(model, config.exit_layer, draft_len=draft_len).generate(**inputs,
                                                                                                max_new_tokens=24)
            assert torch.equal(out.sequences, expected)


def test_vision_probe_labels_are_the_scene_cells():
    indices = [3, 17, 123456]
    labels = recipe.VisionProbe.labels(indices)
    for row, index in enumerate(indices):
        shapes = {shape.row * scenes.GRID + shape.column: shape for shape in scenes.make_scene(index).shapes}
        for cell in range(scenes.GRID * scenes.GRID):
            for name, values in recipe.VisionProbe.ATTRIBUTES:
                expected = tuple(values).index(getattr(shapes[cell], name)) + 1 if cell in shapes else 0
                assert labels[name][row, cell] == expected
            assert labels["cell"][row, cell] == cell


def test_grounding_phase_asks_only_grounding_questions():
    config = recipe.TinyConfig(vision_warmup_steps=16, count_steps=8, grounding_steps=24)
    assert recipe.step_kinds(config, 0) == recipe.step_kinds(config, 23) == ("count_all",)
    assert recipe.step_kinds(config, 24) == recipe.step_kinds(config, 47) == scenes.GROUNDING_KINDS
    assert recipe.step_kinds(config, 48) is None
    drawn = {scenes.make_turn(scenes.make_scene(i), i, None, scenes.GROUNDING_KINDS).kind for i in range(400)}
    assert drawn == set(scenes.GROUNDING_KINDS)
    everything = {scenes.make_turn(scenes.make_scene(i), i).kind for i in range(400)}
    assert everything == set(scenes.QUESTION_KINDS)
    with pytest.raises(ValueError, match="kinds"):
        scenes.make_turn(scenes.make_scene(0), 0, None, ("sing",))


def test_learning_rate_warms_up_again_when_the_text_model_starts():
    config = recipe.TinyConfig(steps=1000, warmup_steps=50, vision_warmup_steps=100, learning_rate=1e-3)
    peak = config.learning_rate
    assert recipe.learning_rate(config, 0) == pytest.approx(peak / 50)
    assert recipe.learning_rate(config, 49) == pytest.approx(peak)
    assert recipe.learning_rate(config, 100) == pytest.approx(peak / 50)
    assert recipe.learning_rate(config, 149) == pytest.approx(peak)
    assert recipe.learning_rate(config, 999) == pytest.approx(peak * config.min_lr_ratio, rel=1e-3)


def test_resume_refuses_another_configuration(tmp_path):
    config = recipe.reduced(steps=4)
    recipe.train(config, tmp_path / "out", tmp_path / "work", stop_after=2, print_fn=lambda line: None)
    with pytest.raises(ValueError, match="another configuration"):
        recipe.train(recipe.reduced(steps=5), tmp_path / "out", tmp_path / "work", print_fn=lambda line: None)


def test_missing_files_say_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_tiny_vlm.py"):
        tiny.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="imitation"):
        tiny.load_imitation(model=object(), folder=tmp_path / "imitation")
    with pytest.raises(ValueError, match="seed"):
        tiny.scene(-1)


# ---- the shipped model ---------------------------------------------------------------------------------------

shipped = pytest.mark.skipif(not tiny.is_built(), reason="the tiny VLM's weights are not built yet "
                             "(python python/build_tiny_vlm.py writes them to fastvlm_kernels/models/tiny)")


@shipped
def test_shipped_files_are_small_and_fp16():
    size = sum(f.stat().st_size for f in tiny.FOLDER.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    assert size < 40 * 2 ** 20
    from safetensors.torch import load_file
    weights = load_file(str(tiny.FOLDER / "model.safetensors"))
    assert {tensor.dtype for tensor in weights.values()} == {torch.float16}


@shipped
def test_shipped_model_decodes_losslessly_and_drafts_well():
    from fastvlm_kernels import SelfSpeculativeDecoder

    model, processor = tiny.load()
    accepted = []
    for seed in (0, 1, 2):
        image, prompt = tiny.scene(seed, kind="describe")
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        expected = model.generate(**inputs, max_new_tokens=64)
        out = SelfSpeculativeDecoder(model, tiny.EXIT_LAYER, draft_len=4).generate(**inputs, max_new_tokens=64)
        assert torch.equal(out.sequences, expected)
        accepted.append(out.stats.mean_accepted)
    # The joint phase trained layer EXIT_LAYER to predict: plain early exit keeps most of a 4-token draft.
    assert sum(accepted) / len(accepted) > 2.0


@shipped
def test_shipped_model_reads_the_image():
    """Held-out scenes: the answers' loss is far lower with each scene's own image than with another scene's,
    and counting answers are right far more often than the most common answer would be (~25%)."""
    model, processor = tiny.load()
    indices = [recipe.HELD_OUT_SEED + i for i in range(48)]
    batch = recipe.encode_batch(processor, indices)
    with torch.no_grad():
        own = recipe.joint_loss(model, batch, tiny.EXIT_LAYER, 1.0)[1]
        shuffled = recipe.joint_loss(model, dict(batch, pixel_values=batch["pixel_values"].roll(1, 0)),
                                     tiny.EXIT_LAYER, 1.0)[1]
    assert shuffled > own + 0.15, (float(own), float(shuffled))
    correct = total = 0
    for seed in range(24):
        kind = ("count_all", "count_kind")[seed % 2]
        image, prompt = tiny.scene(seed, kind=kind)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += answer.strip() == tiny.answer(seed, kind=kind)
        total += 1
    assert correct / total >= 0.5, f"{correct}/{total} counting answers right"


def _accepted_per_step(model, processor, imitation, exit_layer: int, scenes: int, draft_len: int = 8):
    """Mean drafted tokens kept per step over "describe" scenes 100.., plain early exit and with ``imitation``
    at ``exit_layer``; every output checked identical to model.generate."""
    from fastvlm_kernels import SelfSpeculativeDecoder

    plain, imitated = [], []
    for seed in range(scenes):
        image, prompt = tiny.scene(100 + seed, kind="describe")
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        expected = model.generate(**inputs, max_new_tokens=64, do_sample=False)
        for network, sink in ((None, plain), (imitation, imitated)):
            out = SelfSpeculativeDecoder(model, exit_layer, imitation=network, draft_len=draft_len).generate(
                **inputs, max_new_tokens=64)
            assert torch.equal(out.sequences, expected)
            sink.extend(a for step in out.stats.accepted for a in step)
    return sum(plain) / len(plain), sum(imitated) / len(imitated)


@shipped
def test_shipped_imitation_network_keeps_more_of_each_draft():
    """The shipped imitation network, at the exit layer it was trained for, keeps more of each 8-token draft
    than plain early exit at the same exit layer, with output identical to model.generate. Measured on these
    16 scenes: 4.95 vs 4.55 accepted per step; the issue's goal (+1.0) is not reached on this model, whose
    exit the joint phase already trained to draft (models/tiny/README.md)."""
    model, processor = tiny.load()
    imitation = tiny.load_imitation(model)
    plain, imitated = _accepted_per_step(model, processor, imitation, imitation.config.exit_layer, scenes=16)
    assert imitated - plain >= 0.1, f"accepted per step: {plain:.2f} plain, {imitated:.2f}"


@shipped
def test_shipped_exit_one_network_keeps_a_token_more_per_draft():
    """The exit-layer-1 network (one decoder layer, 12,000 scenes): at exit layer 1 and draft length 8 it keeps at
    least one more drafted token per step than plain early exit at the same exit layer and draft length (the
    imitation issue's goal), with output identical to model.generate. Measured on these 12 scenes: 3.31 vs 1.93
    (at k = 4: 2.41 vs 1.70)."""
    model, processor = tiny.load()
    imitation = tiny.load_imitation(model, exit_layer=1)
    assert imitation.config.exit_layer == 1
    plain, imitated = _accepted_per_step(model, processor, imitation, 1, scenes=12)
    assert imitated - plain >= 1.0, f"accepted per step: {plain:.2f} plain, {imitated:.2f}"


@shipped
def test_load_imitation_by_exit_layer():
    model, _ = tiny.load()
    assert tiny.load_imitation(model).config.exit_layer == tiny.EXIT_LAYER
    assert set(tiny.IMITATION_NETWORKS) == {tiny.EXIT_LAYER, 1}
    with pytest.raises(ValueError, match="exit_layer=5"):
        tiny.load_imitation(model, exit_layer=5)
    with pytest.raises(ValueError, match="trained for exit layer 1"):
        tiny.load_imitation(model, tiny.FOLDER / "imitation_e1", exit_layer=2)


def test_build_recipe_trains_the_networks_the_package_names():
    """python/build_tiny_vlm.py's IMITATION_SPECS and tiny.IMITATION_NETWORKS name the same folders for the same
    exit layers (the build writes what load_imitation reads)."""
    specs = load_program("build_tiny_vlm").IMITATION_SPECS
    built = {spec.exit_layer if spec.exit_layer is not None else tiny.EXIT_LAYER: spec.folder for spec in specs}
    assert built == tiny.IMITATION_NETWORKS


@shipped
def test_adaptive_drafting_on_the_shipped_model_drafts_and_stays_lossless():
    """The adaptive decoder on the shipped model: output identical to model.generate, it drafts, and a good
    share of what it drafts is kept. (Whether a step drafts or runs plain follows the measured time per
    emitted token, so the number of plain steps depends on the machine's load and is not asserted.)"""
    from fastvlm_kernels import SelfSpeculativeDecoder

    model, processor = tiny.load()
    imitation = tiny.load_imitation(model)
    decoder = SelfSpeculativeDecoder(model, imitation.config.exit_layer, imitation=imitation, draft_len="adaptive")
    for seed in (200, 201):
        image, prompt = tiny.scene(seed, kind="describe")
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        expected = model.generate(**inputs, max_new_tokens=64, do_sample=False)
        out = decoder.generate(**inputs, max_new_tokens=64)
        assert torch.equal(out.sequences, expected)
        kept = sum(a for step in out.stats.accepted for a in step)
        assert out.stats.drafted > 0 and kept >= 0.3 * out.stats.drafted, (kept, out.stats.drafted)
