"""KVCache: append / rollback / compact against a plain-list model (a hypothesis state machine), bad input
that leaves the cache unchanged, and tiny transformers models (Llama, LLaVA) decoding with the cache exactly
as with their own DynamicCache."""
import inspect

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fastvlm_kernels import KVCache

from .helpers import skip_unless_runnable

NUM_LAYERS, BATCH, HEADS, HEAD_DIM, MAX_LEN = 3, 3, 2, 8, 24


class CacheModel(RuleBasedStateMachine):
    """The cache as lists: rows[layer][b] is a list of [2, Hkv, D] tensors, one per position."""

    @initialize()
    def setup(self):
        self.cache = KVCache(NUM_LAYERS, BATCH, HEADS, HEAD_DIM, MAX_LEN, torch.float32, "cpu")
        self.rows = [[[] for _ in range(BATCH)] for _ in range(NUM_LAYERS)]
        self.nbytes = self.cache.nbytes
        self.data_ptr = self.cache.buffer.data_ptr()
        self.counter = 0

    def _shortest(self, b):
        return min(len(self.rows[layer][b]) for layer in range(NUM_LAYERS))

    def _fresh(self, shape):
        self.counter += 1
        return torch.randn(*shape, generator=torch.Generator().manual_seed(self.counter))

    @rule(layer=st.integers(0, NUM_LAYERS - 1), num_new=st.integers(0, 9))
    def append(self, layer, num_new):
        keys = self._fresh((BATCH, HEADS, num_new, HEAD_DIM))
        values = self._fresh((BATCH, HEADS, num_new, HEAD_DIM))
        if max(len(row) for row in self.rows[layer]) + num_new > MAX_LEN:
            before, lengths = self.cache.buffer.clone(), self.cache.lengths.clone()
            with pytest.raises(ValueError, match="the cache is full"):
                self.cache.append(layer, keys, values)
            assert torch.equal(self.cache.buffer, before) and torch.equal(self.cache.lengths, lengths)
            return
        self.cache.append(layer, keys, values)
        for b in range(BATCH):
            for t in range(num_new):
                self.rows[layer][b].append(torch.stack([keys[b, :, t], values[b, :, t]]))

    @rule(data=st.data())
    def rollback(self, data):
        new_lens = [data.draw(st.integers(0, self._shortest(b))) for b in range(BATCH)]
        form = data.draw(st.sampled_from(["list", "tensor", "tensor+host"]))
        if form == "list":
            self.cache.rollback(new_lens)
        else:
            self.cache.rollback(torch.tensor(new_lens, dtype=torch.int32),
                                host_lens=new_lens if form == "tensor+host" else None)
        for layer in range(NUM_LAYERS):
            for b in range(BATCH):
                del self.rows[layer][b][new_lens[b]:]

    @rule(data=st.data())
    def compact(self, data):
        starts, paths = [], []
        for b in range(BATCH):
            shortest = self._shortest(b)
            start = data.draw(st.integers(0, shortest))
            nodes = sorted(data.draw(st.sets(st.integers(0, max(shortest - start - 1, 0)), max_size=8))) \
                if shortest > start else []
            starts.append(start)
            paths.append(nodes)
        width = max([len(p) for p in paths] + [data.draw(st.integers(0, 2))])
        accepted = torch.tensor([p + [-1] * (width - len(p)) for p in paths], dtype=torch.int64).reshape(BATCH, width)
        if data.draw(st.booleans()):   # the decoder's way: lengths known on the host, nothing read back
            host_lens = [starts[b] + len(paths[b]) for b in range(BATCH)]
            self.cache.compact(torch.tensor(starts, dtype=torch.int32), accepted, host_lens, validate=False)
        else:
            self.cache.compact(torch.tensor(starts, dtype=torch.int32), accepted)
        for layer in range(NUM_LAYERS):
            for b in range(BATCH):
                row = self.rows[layer][b]
                self.rows[layer][b] = row[:starts[b]] + [row[starts[b] + node] for node in paths[b]]

    @invariant()
    def matches_model(self):
        lengths = [[len(row) for row in layer_rows] for layer_rows in self.rows]
        assert self.cache.host_lengths == lengths
        assert self.cache.lengths.tolist() == lengths
        for layer in range(NUM_LAYERS):
            keys, values = self.cache.layer(layer)
            for b in range(BATCH):
                if lengths[layer][b]:
                    expected = torch.stack(self.rows[layer][b])                     # [len, 2, Hkv, D]
                    assert torch.equal(keys[b, :, :lengths[layer][b]], expected[:, 0].transpose(0, 1))
                    assert torch.equal(values[b, :, :lengths[layer][b]], expected[:, 1].transpose(0, 1))
        assert self.cache.nbytes == self.nbytes and self.cache.buffer.data_ptr() == self.data_ptr


TestCacheStateMachine = CacheModel.TestCase
TestCacheStateMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])


# ---- single properties ------------------------------------------------------------------------------------

def _filled(lengths=(5, 5), num_layers=2, max_len=16, dtype=torch.float32):
    cache = KVCache(num_layers, len(lengths), 2, 4, max_len, dtype, "cpu")
    generator = torch.Generator().manual_seed(1)
    for layer in range(num_layers):
        top = max(lengths)
        cache.append(layer, torch.randn(len(lengths), 2, top, 4, generator=generator).to(dtype),
                     torch.randn(len(lengths), 2, top, 4, generator=generator).to(dtype))
    if min(lengths) != max(lengths):
        cache.rollback(list(lengths))
    return cache


def test_layer_views_share_the_buffer():
    cache = _filled()
    keys, values = cache.layer(1)
    assert keys.shape == (2, 2, 16, 4) and keys.data_ptr() == cache.buffer[1, 0].data_ptr()
    assert values.data_ptr() == cache.buffer[1, 1].data_ptr()
    assert cache.lengths.dtype == torch.int32 and cache.lengths.shape == (2, 2)
    assert cache.nbytes >= cache.buffer.numel() * 4


def test_chain_rollback_moves_no_bytes():
    cache = _filled()
    before = cache.buffer.clone()
    cache.rollback(torch.tensor([2, 3], dtype=torch.int32), host_lens=[2, 3])
    assert torch.equal(cache.buffer, before)
    assert cache.host_lengths == [[2, 3], [2, 3]] and cache.lengths.tolist() == [[2, 3], [2, 3]]


def test_ragged_append_writes_each_row_at_its_own_length():
    cache = _filled(lengths=(2, 5))
    keys = torch.randn(2, 2, 3, 4, generator=torch.Generator().manual_seed(2))
    cache.append(0, keys, keys + 1)
    assert torch.equal(cache.layer(0)[0][0, :, 2:5], keys[0]) and torch.equal(cache.layer(0)[0][1, :, 5:8], keys[1])
    assert torch.equal(cache.layer(0)[1][1, :, 5:8], keys[1] + 1)
    assert cache.host_lengths == [[5, 8], [2, 5]]


def test_append_past_max_len_raises_and_leaves_the_cache_unchanged():
    cache = _filled(lengths=(3, 14))
    before, lengths = cache.buffer.clone(), cache.lengths.clone()
    with pytest.raises(ValueError, match="the cache is full.*row 1 from 14 to 17 > max_len=16"):
        cache.append(0, torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4))
    assert torch.equal(cache.buffer, before) and torch.equal(cache.lengths, lengths)
    assert cache.host_lengths == [[3, 14], [3, 14]]


def test_check_room_names_the_layer_and_row_that_would_overflow():
    cache = _filled(lengths=(3, 14))
    cache.check_room(2)                                  # 14 + 2 = 16 fits
    with pytest.raises(ValueError, match="appending T=3 positions to layer 0 would take row 1 from 14 to 17 > "
                                         "max_len=16"):
        cache.check_room(3)
    assert cache.host_lengths == [[3, 14], [3, 14]]


def test_a_traced_append_writes_at_the_device_lengths_without_the_host_copy():
    """Inside torch.compile the append reads no host lengths (they would be guards: a graph per length): it
    writes at the device lengths and advances them; the host copy is the caller's to set after the step."""
    cache = _filled(lengths=(3, 5))
    keys = torch.randn(2, 2, 2, 4, generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    torch.compile(lambda k, v: cache.append_unchecked(0, k, v), backend="eager", fullgraph=True)(keys, keys * 2)
    assert torch.equal(cache.layer(0)[0][0, :, 3:5], keys[0]) and torch.equal(cache.layer(0)[1][1, :, 5:7], keys[1] * 2)
    assert cache.lengths[0].tolist() == [5, 7] and cache.host_lengths[0] == [3, 5]


@pytest.mark.parametrize("keys, values, error, match", [
    (torch.randn(2, 2, 1, 4).double(), torch.randn(2, 2, 1, 4).double(), TypeError, "keys has dtype torch.float64"),
    (torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4).half(), TypeError, "values has dtype torch.float16"),
    (torch.randn(2, 2, 1, 4, device="meta"), torch.randn(2, 2, 1, 4), ValueError, "keys is on meta"),
    (torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4), ValueError, r"keys must have shape \[B=2"),
    (torch.randn(2, 2, 1, 5), torch.randn(2, 2, 1, 5), ValueError, "D=4"),
    (torch.randn(2, 2, 1, 4), torch.randn(2, 2, 2, 4), ValueError, "values must have the shape of keys"),
    (torch.randn(2, 1, 4), torch.randn(2, 1, 4), ValueError, "keys must have 4 dimensions"),
    ("k", torch.randn(2, 2, 1, 4), TypeError, "keys must be a torch.Tensor"),
], ids=["dtype", "values-dtype", "device", "batch", "head-dim", "mismatch", "ndim", "not-tensor"])
def test_append_bad_input(keys, values, error, match):
    cache = _filled()
    before = cache.buffer.clone()
    with pytest.raises(error, match=match):
        cache.append(0, keys, values)
    assert torch.equal(cache.buffer, before) and cache.host_lengths == [[5, 5], [5, 5]]


def test_append_bad_layer():
    cache = _filled()
    with pytest.raises(ValueError, match=r"layer=2 is out of range: the cache has 2 layers \(valid: 0..1\)"):
        cache.append(2, torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    with pytest.raises(TypeError, match="layer must be an int"):
        cache.layer(0.0)


@pytest.mark.parametrize("new_lens, match", [
    ([6, 1], r"new_lens\[0\] = 6 is out of range: row 0 holds 5"),
    ([-1, 1], r"new_lens\[0\] = -1 is out of range"),
    ([1], "must hold B=2 lengths"),
    (torch.tensor([1.0, 1.0]), "new_lens must have dtype"),
])
def test_rollback_bad_input(new_lens, match):
    cache = _filled()
    with pytest.raises((ValueError, TypeError), match=match):
        cache.rollback(new_lens)
    assert cache.host_lengths == [[5, 5], [5, 5]] and cache.lengths.tolist() == [[5, 5], [5, 5]]


def test_rollback_never_extends_a_shorter_layer():
    cache = _filled()
    cache.append(0, torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4))     # layer 0: 7, layer 1: 5
    with pytest.raises(ValueError, match="row 0 holds 5 positions in its shortest layer"):
        cache.rollback([6, 6])


@pytest.mark.parametrize("start, accepted, match", [
    ([1, 1], [[0, 2, 1], [0, 1, -1]], "not strictly increasing"),
    ([1, 1], [[0, 1, 4], [0, -1, -1]], r"reaches past row 0's 5 positions"),
    ([6, 1], [[-1, -1, -1], [0, -1, -1]], r"reaches past row 0's 5 positions"),
    ([1, 1], [[0, 1, 20], [0, -1, -1]], "points past the cache"),
    ([1, 1], [[-1, 1, 2], [0, -1, -1]], "after -1 padding"),
    ([-1, 1], [[0, 1, 2], [0, -1, -1]], "start must be >= 0"),
])
def test_compact_bad_input(start, accepted, match):
    cache = _filled()
    before = cache.buffer.clone()
    with pytest.raises(ValueError, match=match):
        cache.compact(start, torch.tensor(accepted))
    assert torch.equal(cache.buffer, before) and cache.host_lengths == [[5, 5], [5, 5]]


def test_compact_shape_and_dtype_errors():
    cache = _filled()
    with pytest.raises(TypeError, match="accepted must have dtype"):
        cache.compact([0, 0], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="accepted.shape"):
        cache.compact([0, 0], torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="accepted is on meta"):
        cache.compact([0, 0], torch.zeros(2, 2, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match=r"start must have shape \[B=2\]"):
        cache.compact([0, 0, 0], torch.zeros(2, 2, dtype=torch.int64))


def test_compact_with_host_lens_reads_nothing_and_moves_the_path():
    cache = _filled(lengths=(5, 5))
    keys = cache.layer(1)[0].clone()
    cache.compact(torch.tensor([1, 0]), torch.tensor([[0, 2, 3], [4, -1, -1]]), host_lens=[4, 1], validate=False)
    assert cache.host_lengths == [[4, 1], [4, 1]] and cache.lengths.tolist() == [[4, 1], [4, 1]]
    assert torch.equal(cache.layer(1)[0][0, :, 1:4], keys[0, :, [1, 3, 4]])
    assert torch.equal(cache.layer(1)[0][1, :, 0], keys[1, :, 4])


def test_compact_layers_moves_only_those_layers_and_sets_every_length():
    """Layer groups holding a tree's nodes in different orders (the decoder's dynamic tree): each group
    compacted with its own path; every layer's length set by each call."""
    cache = _filled(lengths=(5, 5))
    before = cache.buffer.clone()
    cache.compact(torch.tensor([1, 0]), torch.tensor([[0, 3, -1], [0, 2, 4]]), host_lens=[3, 3], validate=False,
                  layers=slice(0, 1))
    assert torch.equal(cache.buffer[1], before[1])                                   # layer 1 untouched
    assert torch.equal(cache.buffer[0, :, 0, :, 1:3], before[0, :, 0, :, [1, 4]])
    assert torch.equal(cache.buffer[0, :, 1, :, 0:3], before[0, :, 1, :, [0, 2, 4]])
    cache.compact(torch.tensor([1, 0]), torch.tensor([[0, 1, -1], [0, 1, 3]]), host_lens=[3, 3], validate=False,
                  layers=slice(1, None))
    assert torch.equal(cache.buffer[1, :, 1, :, 0:3], before[1, :, 1, :, [0, 1, 3]])
    assert cache.host_lengths == [[3, 3], [3, 3]] and cache.lengths.tolist() == [[3, 3], [3, 3]]
    with pytest.raises(TypeError, match="layers must be a slice"):
        cache.compact([0, 0], torch.tensor([[0, -1], [0, -1]]), layers=1)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_layers=0), ValueError, "num_layers must be >= 1"),
    (dict(batch=2.0), TypeError, "batch must be an int"),
    (dict(dtype=torch.int8), TypeError, "dtype must be one of"),
])
def test_constructor_bad_input(kwargs, error, match):
    arguments = dict(num_layers=1, batch=1, num_kv_heads=1, head_dim=4, max_len=4, dtype=torch.float32)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        KVCache(**arguments)


def test_layer_views_feed_verify_attention():
    """The layout verify_attention reads: append a ragged prefix and T new tokens, attend in place."""
    from fastvlm_kernels import verify_attention
    from fastvlm_kernels.ops.verify_attention import verify_attention_reference
    generator = torch.Generator().manual_seed(5)
    cache = KVCache(2, 2, 2, 64, 40, torch.float32, "cpu")
    for layer in range(2):
        prefix = torch.randn(2, 2, 12, 64, generator=generator)
        cache.append(layer, prefix, prefix * 0.5)
    cache.rollback([7, 12])
    new = torch.randn(2, 2, 3, 64, generator=generator)
    cache.append(1, new, -new)
    prefix_lens = cache.lengths[1] - 3
    q = torch.randn(2, 4, 3, 64, generator=generator)
    keys, values = cache.layer(1)
    out = verify_attention(q, keys, values, prefix_lens)
    expected, _ = verify_attention_reference(q, keys, values, prefix_lens, None, 64 ** -0.5)
    torch.testing.assert_close(out, expected.to(out.dtype), rtol=1e-5, atol=1e-5)
    assert torch.equal(keys[0, :, 7:10], new[0]) and torch.equal(values[1, :, 12:15], -new[1])


def test_transformers_cache_needs_equal_lengths():
    pytest.importorskip("transformers")
    cache = _filled(lengths=(3, 5))
    with pytest.raises(ValueError, match=r"different lengths \[3, 5\].*equal lengths across rows"):
        cache.as_transformers_cache()


# ---- transformers models --------------------------------------------------------------------------------

def _cache_argument(model) -> str:
    """transformers renamed past_key_values to cache (5.2x); use the name this version's forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _tiny_llama_config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _decode(model, cache, prefill_inputs, steps, generator):
    """Prefill, then `steps` single-token steps (greedy), then drop 2 positions with crop and go on twice:
    returns every step's logits."""
    name = _cache_argument(model)
    logits = []
    output = model(**prefill_inputs, use_cache=True, **{name: cache})
    logits.append(output.logits)
    token = output.logits[:, -1:].argmax(-1)
    for step in range(steps):
        output = model(input_ids=token, use_cache=True, **{name: cache})
        logits.append(output.logits)
        token = output.logits[:, -1:].argmax(-1)
        if step == steps - 3:
            cache.crop(-2)
            token = torch.randint(3, 100, token.shape, generator=generator)
    return logits


def _kv_cache_for(text_config, batch, max_len, dtype=torch.float32):
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return KVCache(text_config.num_hidden_layers, batch, text_config.num_key_value_heads, head_dim, max_len,
                   dtype, "cpu")


def test_tiny_llama_decodes_exactly_as_with_dynamic_cache():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = _tiny_llama_config()
    model = transformers.LlamaForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        expected = _decode(model, transformers.DynamicCache(config=config), inputs, 6,
                           torch.Generator().manual_seed(1))
        kv_cache = _kv_cache_for(config, 2, 32)
        nbytes = kv_cache.nbytes
        result = _decode(model, kv_cache.as_transformers_cache(), inputs, 6, torch.Generator().manual_seed(1))
    assert len(result) == len(expected) == 7
    for step, (ours, theirs) in enumerate(zip(result, expected)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=f"step {step}")
    assert kv_cache.host_lengths == [[9 + 6 - 2] * 2] * 2 and kv_cache.nbytes == nbytes


def test_tiny_llama_generate_with_the_cache():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = _tiny_llama_config()
    model = transformers.LlamaForCausalLM(config).eval()
    input_ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    arguments = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=6,
                     do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    kv_cache = _kv_cache_for(config, 2, 32)
    ours = model.generate(**arguments, **{_cache_argument(model): kv_cache.as_transformers_cache()})
    theirs = model.generate(**arguments)
    assert torch.equal(ours.sequences, theirs.sequences)
    for step, (a, b) in enumerate(zip(ours.logits, theirs.logits)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"step {step}")
    # generate stops appending once it has the last token: 7 prompt + 5 fed back
    assert kv_cache.host_lengths[0] == [12, 12]


def _tiny_llava():
    """A LLaVA with a 2-layer CLIP tower (28x28 images, 4 patches) and the tiny Llama, random weights, and a
    batch of 2 prompts with one image each."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    image_token = 120
    config = LlavaConfig(vision_config=vision, text_config=_tiny_llama_config(), image_token_index=image_token,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(3)
    text = torch.randint(3, 100, (2, 6), generator=generator)
    input_ids = torch.cat([text[:, :2], torch.full((2, 4), image_token), text[:, 2:]], dim=1)   # 4 patches
    inputs = {"input_ids": input_ids, "pixel_values": torch.randn(2, 3, 28, 28, generator=generator)}
    return model, config, inputs


def test_tiny_llava_generate_with_the_cache():
    pytest.importorskip("transformers")
    model, config, inputs = _tiny_llava()
    arguments = dict(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), max_new_tokens=5,
                     do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    kv_cache = _kv_cache_for(config.text_config, 2, 32)
    ours = model.generate(**arguments, **{_cache_argument(model): kv_cache.as_transformers_cache()})
    theirs = model.generate(**arguments)
    assert torch.equal(ours.sequences, theirs.sequences)
    for step, (a, b) in enumerate(zip(ours.logits, theirs.logits)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"step {step}")
    assert kv_cache.host_lengths[0] == [10 + 4, 10 + 4]


def test_tiny_llava_decodes_exactly_as_with_dynamic_cache():
    transformers = pytest.importorskip("transformers")
    model, config, inputs = _tiny_llava()
    with torch.no_grad():
        expected = _decode(model, transformers.DynamicCache(config=config.text_config), inputs, 5,
                           torch.Generator().manual_seed(4))
        kv_cache = _kv_cache_for(config.text_config, 2, 32)
        result = _decode(model, kv_cache.as_transformers_cache(), inputs, 5, torch.Generator().manual_seed(4))
    for step, (ours, theirs) in enumerate(zip(result, expected)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=f"step {step}")
    assert kv_cache.host_lengths[1] == [10 + 5 - 2] * 2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cache_follows_the_cpu_cache(backend):
    """The same ragged appends, rollback and tree compaction on a CUDA cache and a CPU cache: same bytes."""
    from fastvlm_kernels.ops.kv_cache import BACKENDS

    caches = [KVCache(3, 2, 4, 64, 48, torch.float16, device) for device in ("cpu", "cuda")]
    reasons = next(b for b in BACKENDS if b.name == backend).not_supported_reasons(caches[1].buffer)
    skip_unless_runnable(backend, reasons)
    generator = torch.Generator().manual_seed(9)
    steps = [("append", 0, 10), ("append", 1, 10), ("append", 2, 10), ("rollback", [6, 9]),
             ("append", 0, 12), ("append", 1, 12), ("append", 2, 12),
             ("compact", [6, 9], [[0, 3, 4, 11], [0, 1, 7, -1]]), ("append", 1, 3)]
    for step in steps:
        if step[0] == "append":
            keys = torch.randn(2, 4, step[2], 64, generator=generator).half()
            for cache in caches:
                cache.append(step[1], keys.to(cache.device), (keys * 2).to(cache.device))
        elif step[0] == "rollback":
            for cache in caches:
                cache.rollback(torch.tensor(step[1], dtype=torch.int32, device=cache.device), host_lens=step[1])
        else:
            for cache in caches:
                cache.compact(torch.tensor(step[1], device=cache.device),
                              torch.tensor(step[2], device=cache.device),
                              backend=backend if cache.device.type == "cuda" else "auto")
    assert caches[0].host_lengths == caches[1].host_lengths
    assert caches[1].lengths.cpu().tolist() == caches[0].host_lengths
    assert torch.equal(caches[0].buffer, caches[1].buffer.cpu())
