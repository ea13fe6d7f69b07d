"""The teacher cache: stored outputs equal the live teacher's, builds continue, grow with the data (stored
examples found by identity) and refuse other builds, and
training from the cache follows online training."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fastvlm_kernels.decoding.adapters import adapter_for
from fastvlm_kernels.imitation import TrainConfig, train_imitation
from fastvlm_kernels.imitation.data import Encoder, load_examples
from fastvlm_kernels.imitation.teacher_cache import TeacherCache, _from_rows, _to_rows, rotary_layout
from fastvlm_kernels.imitation.teacher import Taps, cached_teacher, model_fingerprint, teacher_forward
from tests.decoding.models import NUM_LAYERS, build

from .helpers import llava_processor, tokenizer, write_image, write_prompts


def _llava_data(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        if i % 3 == 2:   # some text-only rows among the image rows
            lines.append({"prompt": f"w{30 + i} w31 w{40 + i}", "response": f"w{50 + i} w7 w8"})
            continue
        write_image(folder / f"img{i}.png", i)
        lines.append({"prompt": f"w{5 + i} <image> w{9 + i}", "image": f"img{i}.png",
                      "response": " ".join(f"w{(13 * i + j) % 90 + 3}" for j in range(2 + i % 4))})
    (folder / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def _setup(family, tmp_path, count=7):
    case = build(family, seed=4)
    if family == "llava":
        _llava_data(tmp_path / "data", count)
        encoder = Encoder(llava_processor())
    else:
        write_prompts(tmp_path / "data", count, seed=5, responses=True)
        encoder = Encoder(tokenizer())
    examples = load_examples(tmp_path / "data", image_token=encoder.image_token, allow_images=encoder.takes_images)
    return case.model, encoder, examples


def _build(model, encoder, examples, folder, exit_layer=1, target_layer=NUM_LAYERS, batch_size=3):
    return TeacherCache.build(model, encoder, examples, folder, exit_layer=exit_layer, target_layer=target_layer,
                              model_fingerprint=model_fingerprint(model), batch_size=batch_size, progress=False)


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_cached_teacher_equals_the_live_one(tmp_path, family):
    """A batch read from the cache (rows put together differently from how they were built) holds the live
    teacher's layer-E states, targets, logits (over a vocabulary subset too), rotary tables and loss mask."""
    model, encoder, examples = _setup(family, tmp_path)
    adapter = adapter_for(model)
    exit_layer, target_layer = 2, 3
    cache = _build(model, encoder, examples, tmp_path / "cache", exit_layer, target_layer)
    cache.check(exit_layer=exit_layer, target_layer=target_layer, model_fingerprint=model_fingerprint(model),
                encoder=encoder, examples=examples)
    taps = Taps(adapter.layers, exit_layer, target_layer)
    vocab = torch.tensor([0, 2, 5, 9, 17, 33, 64, 99])
    for indices in ([4, 0, 6], [1], [2, 3, 5, 1]):
        for subset in (None, vocab):
            batch = encoder.collate([examples[i] for i in indices])
            live = teacher_forward(adapter, taps, batch, subset)
            stored, loss_mask = cached_teacher(adapter, cache, indices, subset, torch.float32, "cpu")
            assert torch.equal(loss_mask, batch.loss_mask)
            real = batch.model_inputs["attention_mask"].bool()
            torch.testing.assert_close(stored.exit_states[real], live.exit_states[real])
            assert torch.all(stored.exit_states[~real] == 0)
            torch.testing.assert_close(stored.targets, live.targets)
            torch.testing.assert_close(stored.logits, live.logits)
            for got, want in zip(stored.position_embeddings, live.position_embeddings):
                lead = got.dim() - 3
                want = want.expand(got.shape)
                for b in range(len(indices)):
                    length = int(real[b].sum())
                    torch.testing.assert_close(got[(slice(None),) * lead + (b, slice(0, length))],
                                               want[(slice(None),) * lead + (b, slice(0, length))])


@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_rotary_tables_go_to_rows_and_back(family):
    """Per-row storage keeps the models' own rotary tables, a [3, B, T, D] layout (position kinds first) and a
    table shared by the rows ([1, T, D], stored once per row)."""
    case = build(family, seed=0, batch=2)
    adapter = adapter_for(case.model)
    from fastvlm_kernels.imitation.data import TrainBatch
    mask = case.inputs["attention_mask"].bool()
    teacher = teacher_forward(adapter, Taps(adapter.layers, 1, 2), TrainBatch(dict(case.inputs), mask))
    for table in teacher.position_embeddings:
        lead, tail = rotary_layout(table, 2, mask.shape[1])
        assert lead in ((), (3,)) and tail == (table.shape[-1],)
        rows = _to_rows(table, lead, tail, 2)
        assert rows.shape[:2] == (2, mask.shape[1])
        assert torch.equal(_from_rows(rows, lead, tail), table.float())
    generator = torch.Generator().manual_seed(1)
    shared = torch.randn(1, 5, 8, generator=generator)
    rows = _to_rows(shared, *rotary_layout(shared, 3, 5), 3)
    assert torch.equal(_from_rows(rows, (), (8,)), shared.expand(3, 5, 8))
    # three position kinds before [B, T] (Qwen2-VL's M-RoPE before merging)
    sections = torch.randn(3, 2, 5, 8, generator=generator)
    lead, tail = rotary_layout(sections, 2, 5)
    assert (lead, tail) == ((3,), (8,))
    rows = _to_rows(sections, lead, tail, 2)
    assert torch.equal(rows[1, 4], sections[:, 1, 4].reshape(-1))
    assert torch.equal(_from_rows(rows, lead, tail), sections)
    with pytest.raises(ValueError, match="cannot find"):
        rotary_layout(torch.randn(4, 6, 8), 3, 5)


def _other_example(tmp_path):
    write_prompts(tmp_path / "other", 1, seed=23, responses=True)
    return load_examples(tmp_path / "other")[0]


def test_a_build_continues_where_it_stopped_grows_and_refuses_other_builds(tmp_path):
    model, encoder, examples = _setup("llama", tmp_path, count=8)
    whole = _build(model, encoder, examples, tmp_path / "whole")
    part = _build(model, encoder, examples[:3], tmp_path / "parts")
    assert len(part) == 3
    with pytest.raises(ValueError, match="unfinished build"):
        part.check(exit_layer=1, target_layer=NUM_LAYERS, model_fingerprint=model_fingerprint(model), encoder=encoder,
                   examples=examples)
    with open(tmp_path / "parts" / "exit_1.f32", "ab") as handle:   # a build killed half way through a batch
        handle.write(torch.randn(100, generator=torch.Generator().manual_seed(2)).numpy().tobytes())
    continued = _build(model, encoder, examples, tmp_path / "parts")
    assert continued.index == whole.index
    assert (tmp_path / "whole" / "last.f32").stat().st_size == 0     # the target is the last layer's output
    for name in ("exit_1", "target", "cos", "sin"):   # batched differently: equal up to rounding
        got, want = ((tmp_path / folder / f"{name}.f32").read_bytes() for folder in ("parts", "whole"))
        assert len(got) == len(want)
        torch.testing.assert_close(torch.frombuffer(bytearray(got), dtype=torch.float32),
                                   torch.frombuffer(bytearray(want), dtype=torch.float32))
    fingerprint = model_fingerprint(model)
    with pytest.raises(ValueError, match=r"holds exit layers \[1\], not \[2\]"):
        _build(model, encoder, examples, tmp_path / "whole", exit_layer=2)
    with pytest.raises(ValueError, match="exit_layer=2"):
        whole.check(exit_layer=2, target_layer=NUM_LAYERS, model_fingerprint=model_fingerprint(model),
                    encoder=encoder, examples=examples)
    # other examples, or these in another order: the stored ones are read by identity, never run again
    stored = whole.index
    reordered = _build(model, encoder, examples[::-1], tmp_path / "whole")
    assert reordered.index == stored
    whole.check(exit_layer=1, target_layer=NUM_LAYERS, model_fingerprint=fingerprint, encoder=encoder,
                examples=examples[::-1])
    for i in range(len(examples)):
        a, b = reordered.batch([i]), whole.batch([len(examples) - 1 - i])
        assert torch.equal(a.exit_states, b.exit_states) and torch.equal(a.targets, b.targets)
    # a larger data set with the stored examples among the new ones (a run's random hold-out moves every
    # position): only the new ones are run, appended; each is served as a build from scratch would serve it
    write_prompts(tmp_path / "more", 5, seed=11, responses=True)
    more = load_examples(tmp_path / "more")
    mixed = [more[0], examples[4], more[1], *examples[:4], *more[2:], *examples[5:]]
    calls = []
    import fastvlm_kernels.imitation.teacher_cache as module
    real = module._teacher_rows
    def counting(adapter, taps, encoder_, batch_examples, *args):
        calls.append(len(batch_examples))
        return real(adapter, taps, encoder_, batch_examples, *args)
    module._teacher_rows = counting
    try:
        grown = _build(model, encoder, mixed, tmp_path / "whole")
    finally:
        module._teacher_rows = real
    assert sum(calls) == len(more) and len(grown) == len(examples) + len(more)
    assert grown.index["examples"][:len(examples)] == stored["examples"]
    fresh = _build(model, encoder, mixed, tmp_path / "fresh")
    for i in range(len(mixed)):
        a, b = grown.batch([i]), fresh.batch([i])
        assert a.loss_mask.tolist() == b.loss_mask.tolist()
        torch.testing.assert_close(a.exit_states, b.exit_states)
        torch.testing.assert_close(a.targets, b.targets)
    with pytest.raises(ValueError, match="example 0 of the run .* is not stored"):
        whole.check(exit_layer=1, target_layer=NUM_LAYERS, model_fingerprint=fingerprint, encoder=encoder,
                    examples=load_examples(tmp_path / "data")[:0] + [_other_example(tmp_path)])
    with pytest.raises(ValueError, match="target_layer"):
        whole.check(exit_layer=1, target_layer=2, model_fingerprint=fingerprint, encoder=encoder, examples=examples)
    other = build("llama", seed=9).model
    with pytest.raises(ValueError, match="another model"):
        whole.check(exit_layer=1, target_layer=NUM_LAYERS, model_fingerprint=model_fingerprint(other),
                    encoder=encoder, examples=examples)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        _build(model, encoder, examples, tmp_path / "junk")
    with pytest.raises(ValueError, match="no index.json"):
        TeacherCache(tmp_path / "junk")
    (tmp_path / "whole" / "target.f32").write_bytes(b"")
    with pytest.raises(ValueError, match="shorter than its index"):
        TeacherCache(tmp_path / "whole").batch([0])


def test_one_build_serves_several_exit_layers(tmp_path, monkeypatch):
    """An exit-layer sweep's cache (exit layers 1, 2 and 3 in one build): each layer's batches equal those of
    a cache built for that layer alone; a later build asking for one of its layers reuses it (no new forward),
    one asking for another layer is refused."""
    model, encoder, examples = _setup("llava", tmp_path, count=6)
    sweep = _build(model, encoder, examples, tmp_path / "sweep", exit_layer=(3, 1, 2))
    assert sweep.exit_layers == [1, 2, 3] and sweep.index["format"] == "fastvlm-teacher-cache/2"
    indices = [4, 0, 2]
    for exit_layer in (1, 2, 3):
        alone = _build(model, encoder, examples, tmp_path / f"alone{exit_layer}", exit_layer=exit_layer)
        got, want = sweep.batch(indices, exit_layer=exit_layer), alone.batch(indices)
        torch.testing.assert_close(got.exit_states, want.exit_states)
        torch.testing.assert_close(got.targets, want.targets)
        assert torch.equal(got.loss_mask, want.loss_mask)
        sweep.check(exit_layer=exit_layer, target_layer=NUM_LAYERS, model_fingerprint=model_fingerprint(model),
                    encoder=encoder, examples=examples)
    assert not torch.allclose(sweep.batch(indices, exit_layer=1).exit_states, sweep.batch(indices, exit_layer=3).exit_states)
    before = (tmp_path / "sweep" / "exit_2.f32").read_bytes()
    import fastvlm_kernels.imitation.teacher_cache as module

    def no_forward(*args, **kwargs):
        raise AssertionError("the teacher ran again")
    monkeypatch.setattr(module, "_teacher_rows", no_forward)
    again = _build(model, encoder, examples, tmp_path / "sweep", exit_layer=2)
    assert again.exit_layers == [1, 2, 3] and (tmp_path / "sweep" / "exit_2.f32").read_bytes() == before
    with pytest.raises(ValueError, match="not 4"):
        sweep.batch(indices, exit_layer=4)


def test_training_from_the_cache_follows_online_training(tmp_path):
    """The same run with and without a teacher cache: the same batches, losses and weights up to rounding."""
    case = build("llama", seed=3)
    write_prompts(tmp_path / "data", 12, seed=4, responses=True)
    config = TrainConfig(exit_layer=1, steps=6, batch_size=4, lr=1e-3, warmup_steps=2, eval_fraction=0.0,
                         checkpoint_every=0, seed=7, draft_vocab=40)
    online = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "online", config, progress=False)
    cached = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "cached", config, progress=False,
                             teacher_cache=tmp_path / "cache")
    assert len(TeacherCache(tmp_path / "cache")) == 12
    for a, b in zip(online.history, cached.history):
        for key in ("loss", "cosine", "kd"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a, b)
    for (name, a), (_, b) in zip(online.network.state_dict().items(), cached.network.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert cached.history[-1]["loss"] < cached.history[0]["loss"]
    # a sweep's cache: built for exit layers 1 and 2 by the first run, read at layer 2 by the second; the run
    # at layer 2 follows its own online run as well
    sweep = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "sweep1", config, progress=False,
                            teacher_cache=tmp_path / "sweep", teacher_exit_layers=[1, 2])
    assert TeacherCache(tmp_path / "sweep").exit_layers == [1, 2] and sweep.history[-1]["loss"] == pytest.approx(
        cached.history[-1]["loss"], rel=1e-4)
    config2 = dataclasses.replace(config, exit_layer=2)
    online2 = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "online2", config2, progress=False)
    cached2 = train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "sweep2", config2, progress=False,
                              teacher_cache=tmp_path / "sweep")
    for a, b in zip(online2.history, cached2.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), (a, b)
    with pytest.raises(ValueError, match="must include the run's exit_layer 2"):
        train_imitation(case.model, tokenizer(), tmp_path / "data", tmp_path / "bad", config2, progress=False,
                        teacher_cache=tmp_path / "other", teacher_exit_layers=[1, 3])
