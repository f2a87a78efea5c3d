"""model/cpu_decoder.py (the LLaMA stack as OpenVINO programs) against eager forward_hidden; the OpenVINO VQ
decoder (model/cpu_engine.py) and the numpy attention (model/cpu_attention.py) against their references."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # before paddle is imported

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import pytest  # noqa: E402

from model.config import LlamaConfig  # noqa: E402
from model.cpu_decoder import CpuDecoder, PrecisionUnavailable, check_precision, cpu_capabilities  # noqa: E402
from model.cpu_engine import CpuVQDecoder  # noqa: E402
from model.llama import LlamaModel  # noqa: E402

TOLERANCE = 1e-4  # relative to the largest magnitude; fp32 reassociation alone gives ~1e-6
BLOCK = 8  # small cache blocks so that short rows span several blocks and partial ones
SLOTS, MAX_LEN = 6, 80
GOLDEN = Path(__file__).parent / "golden" / "janus-tiny"


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    # Grouped-query attention (4 heads over 2 kv heads) covers the general case; Janus is the 1:1 case.
    config = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN)
    llama = LlamaModel(config)
    llama.eval()
    rng = np.random.default_rng(7)
    for name, param in llama.named_parameters():
        if len(param.shape) == 1:  # norm weights: away from 1 so that they matter
            param.set_value((1.0 + 0.3 * rng.standard_normal(param.shape)).astype(np.float32))
        else:
            param.set_value((rng.standard_normal(param.shape) / np.sqrt(param.shape[0])).astype(np.float32))
    return llama


@pytest.fixture(scope="module")
def engine(model) -> CpuDecoder:
    return CpuDecoder(model, threads=2)


def eager(model, embeds, cache, slots, start) -> np.ndarray:
    with paddle.no_grad():
        return model(paddle.to_tensor(embeds), cache, slots, start).numpy()


def prefilled_caches(model, lengths: dict[int, int], seed: int):
    """Two caches holding the same eager prefill: one for eager, one for the engine."""
    rng = np.random.default_rng(seed)
    caches = model.new_cache(SLOTS, MAX_LEN, block_size=BLOCK), model.new_cache(SLOTS, MAX_LEN, block_size=BLOCK)
    for slot, length in lengths.items():
        embeds = rng.standard_normal((1, length, model.config.hidden_size)).astype(np.float32)
        for cache in caches:
            eager(model, embeds, cache, [slot], [0])
    return caches


def test_one_program_between_each_two_attentions(engine, model):
    assert len(engine.requests) == model.config.num_hidden_layers + 1
    assert engine.describe() == {"decoder": "openvino", "precision": "exact", "quantized_activations": False,
                                 "threads": 2, "programs": model.config.num_hidden_layers + 1}


def test_decode_steps_match_eager(model, engine):
    """Rows join and leave, sit at different positions (block edges included), slots in any order."""
    lengths = {0: 5, 1: 8, 2: 17, 3: 1, 4: 40, 5: 23}
    eager_cache, engine_cache = prefilled_caches(model, lengths, seed=1)
    rng = np.random.default_rng(2)
    batches = [[1, 2], list(range(SLOTS)), [5, 3, 0], [4], [2, 3, 4], [0, 1], [3, 1, 4, 5, 0, 2], [1, 2]]
    for slots in batches:
        start = [lengths[s] for s in slots]
        embeds = rng.standard_normal((len(slots), 1, model.config.hidden_size)).astype(np.float32)
        want = eager(model, embeds, eager_cache, slots, start)
        got = engine.forward_hidden(embeds, engine_cache, slots, start)
        assert isinstance(got, paddle.Tensor) and got.shape == [len(slots), 1, model.config.hidden_size]
        assert relative_error(got.numpy(), want) < TOLERANCE, (slots, start)
        for s in slots:
            lengths[s] += 1
    for want, got in zip(eager_cache.k + eager_cache.v, engine_cache.k + engine_cache.v):
        assert relative_error(got.numpy(), want.numpy()) < TOLERANCE


def test_step_and_mixed_eager_engine_on_one_cache(model, engine):
    """Engine and eager alternate on the same cache: each reads what the other wrote."""
    lengths = {2: 9, 3: 15}
    eager_cache, shared = prefilled_caches(model, lengths, seed=3)
    rng = np.random.default_rng(4)
    slots = [2, 3]
    for i in range(6):
        start = [lengths[s] for s in slots]
        embeds = rng.standard_normal((2, 1, model.config.hidden_size)).astype(np.float32)
        want = eager(model, embeds, eager_cache, slots, start)
        if i % 2:
            got = eager(model, embeds, shared, slots, start)
        else:
            got = engine.forward_hidden(paddle.to_tensor(embeds), shared, slots, start).numpy()
        assert relative_error(got, want) < TOLERANCE, i
        for s in slots:
            lengths[s] += 1


def test_prefill_through_engine_matches_eager(model, engine):
    """T > 1 (prompt or chunked prefill): causal masks inside the new tokens, rows at different starts."""
    lengths = {0: 0, 4: 11, 5: 16}
    eager_cache, engine_cache = prefilled_caches(model, {4: 11, 5: 16}, seed=5)
    rng = np.random.default_rng(6)
    for slots, tokens in (([0, 4, 5], 7), ([4, 5], 9), ([0], 1)):
        start = [lengths[s] for s in slots]
        embeds = rng.standard_normal((len(slots), tokens, model.config.hidden_size)).astype(np.float32)
        want = eager(model, embeds, eager_cache, slots, start)
        got = engine.forward_hidden(paddle.to_tensor(embeds), engine_cache, slots, start).numpy()
        assert relative_error(got, want) < TOLERANCE, (slots, tokens)
        for s in slots:
            lengths[s] += tokens


def test_two_caches_one_engine(model, engine):
    """The engine re-binds its cache views when it is handed another cache."""
    first_eager, first = prefilled_caches(model, {0: 4}, seed=7)
    second_eager, second = prefilled_caches(model, {0: 30}, seed=8)
    embeds = np.random.default_rng(9).standard_normal((1, 1, model.config.hidden_size)).astype(np.float32)
    for eager_cache, cache, start in ((first_eager, first, 4), (second_eager, second, 30), (first_eager, first, 5)):
        want = eager(model, embeds, eager_cache, [0], [start])
        got = engine.forward_hidden(embeds, cache, [0], [start]).numpy()
        assert relative_error(got, want) < TOLERANCE


@pytest.mark.parametrize("slots, start, tokens, message", [
    ([SLOTS], [0], 1, "out of range"),
    ([1, 1], [0, 0], 1, "repeat"),
    ([0], [MAX_LEN], 1, "exceed"),
    ([0], [MAX_LEN - 2], 3, "exceed"),
    ([0, 1], [0], 1, "one value per batch row"),
])
def test_rejects_bad_addresses(model, engine, slots, start, tokens, message):
    cache = model.new_cache(SLOTS, MAX_LEN, block_size=BLOCK)
    embeds = np.zeros((len(slots), tokens, model.config.hidden_size), np.float32)
    with pytest.raises(ValueError, match=message):
        engine.forward_hidden(embeds, cache, slots, start)


def test_rejects_wrong_width_and_foreign_cache(model, engine):
    cache = model.new_cache(SLOTS, MAX_LEN, block_size=BLOCK)
    with pytest.raises(ValueError, match="embeds"):
        engine.forward_hidden(np.zeros((1, 1, 32), np.float32), cache, [0], [0])
    other = LlamaModel(LlamaConfig(vocab_size=10, hidden_size=64, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="kv heads"):
        engine.forward_hidden(np.zeros((1, 1, 64), np.float32), other.new_cache(2, 8), [0], [0])


def test_janus_tiny_greedy_decode_matches_eager():
    """On the real composite (JanusModel from the golden checkpoint): same greedy tokens and logits."""
    from model.loader import load_model

    janus = load_model(GOLDEN)
    engine = CpuDecoder(janus, threads=2)
    prompt = np.array([[1, 5, 9, 33, 60, 7, 2, 11, 90, 4, 5, 6, 8]], np.int64)
    caches = janus.new_cache(2, 64, block_size=BLOCK), janus.new_cache(2, 64, block_size=BLOCK)
    tokens = {}
    for name, cache in zip(("eager", "engine"), caches):
        hidden = janus.forward_hidden(janus.embed_tokens(prompt), cache, [1], [0])
        ids, logits = [int(janus.text_logits(hidden[:, -1]).numpy().argmax())], []
        for step in range(8):
            embeds = janus.embed_tokens(np.array([[ids[-1]]], np.int64))
            forward = janus.forward_hidden if name == "eager" else engine.forward_hidden
            hidden = forward(embeds, cache, [1], [prompt.shape[1] + step])
            logits.append(janus.text_logits(hidden[:, -1]).numpy())
            ids.append(int(logits[-1].argmax()))
        tokens[name] = (ids, np.concatenate(logits))
    assert tokens["engine"][0] == tokens["eager"][0]
    assert relative_error(tokens["engine"][1], tokens["eager"][1]) < TOLERANCE


def test_release_eager_weights(model):
    """The engine keeps working on its own copy; the eager stack then refuses to run instead of computing garbage."""
    clone = LlamaModel(model.config)
    clone.set_state_dict(model.state_dict())
    clone.eval()
    engine = CpuDecoder(clone, threads=2, release_eager=True)
    assert engine.released_bytes > 0 and not any(p._is_initialized() for p in clone.parameters() if p.ndim == 2
                                                 and p is not clone.embed_tokens.weight)
    eager_cache, engine_cache = prefilled_caches(model, {1: 12}, seed=10)
    embeds = np.random.default_rng(11).standard_normal((1, 3, model.config.hidden_size)).astype(np.float32)
    want = eager(model, embeds, eager_cache, [1], [12])
    assert relative_error(engine.forward_hidden(embeds, engine_cache, [1], [12]).numpy(), want) < TOLERANCE
    with pytest.raises(RuntimeError, match="holds no memory"):
        eager(clone, embeds, clone.new_cache(2, 16), [0], [0])


@pytest.fixture(scope="module")
def vq_decoder() -> CpuVQDecoder:
    """janus-tiny's VQ decoder program, as the worker builds it: on two threads and on one."""
    from model.loader import load_model

    return CpuVQDecoder(load_model(GOLDEN), threads=2, single_thread_copy=True)


def test_vq_decoder_program_reproduces_the_golden_images(vq_decoder):
    """The OpenVINO VQ decoder against the official implementation's decoded pixels and uint8 images."""
    from model.generation import to_uint8_images

    decoder = vq_decoder
    with np.load(GOLDEN / "cases.npz") as data:
        codes, decoded, images = data["vq_decode.codes"], data["vq_decode.decoded"], data["vq_decode.images_uint8"]
    got = decoder.decode(codes)
    np.testing.assert_allclose(got, decoded, rtol=0, atol=1e-4)
    diff = np.abs(to_uint8_images(got).astype(np.int16) - images.astype(np.int16))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 0.001 * diff.size
    np.testing.assert_allclose(decoder.decode(codes[1:]), decoded[1:], rtol=0, atol=1e-4)  # batch size changes freely
    np.testing.assert_allclose(decoder.decode(codes, single_thread=True), decoded, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="codes must lie"):
        decoder.decode(np.full((1, 576), 10**6))
    with pytest.raises(ValueError, match="576"):
        decoder.decode(np.zeros((1, 100), np.int64))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning to one core shows only with two or more")
def test_one_thread_vq_decode_is_not_pinned_to_a_core(vq_decoder):
    """OpenVINO would pin a one-thread run to the process's first core, so the worker's VQ decode and
    the prefill process's image encode, both on one thread, would share that core; pinning is off."""
    import threading

    decoder = vq_decoder
    assert all(compiled.get_property("ENABLE_CPU_PINNING") is False
               for compiled in decoder.program.compiled.values())
    everywhere = os.sched_getaffinity(0)
    codes = np.zeros((2, 576), np.int64)
    seen, started, done = [], threading.Event(), threading.Event()

    def decode():
        seen.append(threading.get_native_id())
        started.set()
        for _ in range(2):
            decoder.decode(codes, single_thread=True)
        done.set()

    thread = threading.Thread(target=decode)
    thread.start()
    started.wait()
    affinities = set()
    while not done.is_set():  # the decodes take about a second: polled thousands of times
        affinities.add(frozenset(os.sched_getaffinity(seen[0])))
    thread.join()
    assert affinities == {frozenset(everywhere)}


@pytest.mark.parametrize("products", ["einsum", "matmul"])
@pytest.mark.parametrize("slots, starts, tokens", [
    ([1], [12], 1),  # one row, partial block
    ([4, 0, 2], [30, 12, 21], 1),  # rows out of slot order, with gaps: three groups
    ([2, 3], [21, 40], 3),  # consecutive slots, several new tokens each (causal within them)
    ([3, 1], [0, 0], 75),  # a fresh prompt (prompt_attention), queries in two chunks
])
def test_eager_numpy_attention_matches_paddle_attention(model, slots, starts, tokens, products, monkeypatch):
    """Eager forward on CPU attends in numpy (model/cpu_attention.py), with either kind of product over
    the cache (chosen by head width); the Paddle path gives the same."""
    import model.cpu_attention as cpu_attention
    import model.llama as llama

    monkeypatch.setattr(cpu_attention, "EINSUM_MIN_HEAD_DIM", 0 if products == "einsum" else 10**6)

    lengths = {0: 12, 1: 12, 2: 21, 3: 40, 4: 30}
    caches = prefilled_caches(model, lengths, seed=20)
    embeds = np.random.default_rng(21).standard_normal((len(slots), tokens, model.config.hidden_size)).astype(np.float32)
    got = eager(model, embeds, caches[0], slots, starts)
    monkeypatch.setattr(llama, "CPU_NUMPY_ATTENTION", False)
    want = eager(model, embeds, caches[1], slots, starts)
    assert relative_error(got, want) < TOLERANCE
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):  # later layers: rounding apart
        assert relative_error(a.numpy(), b.numpy()) < TOLERANCE


def test_cpu_blas_thread_counts_for_large_and_small_products(monkeypatch):
    """model/cpu_blas.py: the small count outside gemm(), the gemm count inside it, and nothing changed in a
    process that never configured it (the counts are process-wide: a CPU runtime built by an earlier test
    may have set them, so this test starts from an unconfigured state and puts everything back)."""
    from model import cpu_blas

    libs = cpu_blas._controllers()
    assert libs, "numpy's BLAS not found"
    original = libs[0].num_threads
    monkeypatch.setattr(cpu_blas, "_gemm_threads", None)
    monkeypatch.setattr(cpu_blas, "_small_threads", None)
    assert not cpu_blas.configured()
    with cpu_blas.gemm():
        assert libs[0].num_threads == original
    try:
        cpu_blas.configure(gemm_threads=2, small_threads=1)
        assert cpu_blas.configured() and libs[0].num_threads == 1
        with cpu_blas.gemm():
            assert libs[0].num_threads == 2
        assert libs[0].num_threads == 1
    finally:
        cpu_blas._set(original)


def test_programs_hold_their_own_weights(model):
    """What lets the worker give the eager weights back (model/cpu_memory.py): once compiled, before any call,
    the programs never read the eager memory their constants were made from, at any row count (OpenVINO
    packs each weight into its own memory when it compiles)."""
    clone = LlamaModel(model.config)
    clone.set_state_dict(model.state_dict())
    clone.eval()
    decoder = CpuDecoder(clone, threads=2)
    for param in clone.parameters():
        np.from_dlpack(param.detach())[...] = np.nan  # in place: the programs' constants were views of this
    assert np.isnan(eager(clone, np.ones((1, 1, model.config.hidden_size), np.float32), clone.new_cache(1, 4), [0], [0])).all()
    rng = np.random.default_rng(12)
    # Every row count up to 24 (OpenVINO may pick another kernel for more rows: model/cpu_memory.PROBE_ROWS)
    for rows, tokens in ((2, 5), (1, 40), (6, 2), *((rows, 1) for rows in range(1, 25))):
        embeds = rng.standard_normal((rows, tokens, model.config.hidden_size)).astype(np.float32)
        want = eager(model, embeds, model.new_cache(rows, 48, block_size=BLOCK), list(range(rows)), [0] * rows)
        got = decoder.forward_hidden(embeds, clone.new_cache(rows, 48, block_size=BLOCK), list(range(rows)), [0] * rows)
        assert relative_error(got.numpy(), want) < TOLERANCE, (rows, tokens)


# How far the lossy programs fall from float32 on this model (3 layers of random weights; measured with float32
# activations: int8 0.8-2.3e-2, int4 0.13-0.26 of the largest magnitude; with quantized activations, as served,
# int8 1.3-3.3e-2, int4 unchanged). Random weights have no outliers to spare: a model of real weights loses less, and
# bench/cpu_bench.py reports both on Janus-1.3B's sizes.
LOSSY_BOUNDS = {"int8": 0.05, "int4": 0.4}


@pytest.mark.parametrize("quantize_activations", [False, True])
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_lossy_precisions_compute_what_their_weights_hold(model, precision, quantize_activations):
    """With float32 activations, exact against eager on the dequantized weights (so the quantization, the int4
    packing and the programs are right); either way, within LOSSY_BOUNDS of float32."""
    from model.cpu_decoder import dequantized

    decoder = CpuDecoder(model, threads=2, precision=precision, quantize_activations=quantize_activations)
    assert decoder.describe()["precision"] == precision
    tolerance = LOSSY_BOUNDS[precision] if quantize_activations else TOLERANCE
    rounded = LlamaModel(model.config)
    rounded.set_state_dict(model.state_dict())
    rounded.eval()
    for name, param in rounded.named_parameters():
        if len(param.shape) == 2 and "embed" not in name:
            param.set_value(dequantized(param.numpy(), precision))
    lengths = {0: 5, 1: 17, 2: 40}
    caches = {"float32": prefilled_caches(model, lengths, seed=13)[0]}
    caches["rounded"], cache = prefilled_caches(rounded, lengths, seed=13)
    rng = np.random.default_rng(14)
    errors = []
    for slots, tokens in (([0, 1, 2], 1), ([2, 0], 1), ([1], 4)):
        start = [lengths[s] for s in slots]
        embeds = rng.standard_normal((len(slots), tokens, model.config.hidden_size)).astype(np.float32)
        want = eager(model, embeds, caches["float32"], slots, start)
        same = eager(rounded, embeds, caches["rounded"], slots, start)
        got = decoder.forward_hidden(embeds, cache, slots, start).numpy()
        assert relative_error(got, same) < tolerance, (slots, tokens)
        errors.append(relative_error(got, want))
        for s in slots:
            lengths[s] += tokens
    fresh = rng.standard_normal((1, 30, model.config.hidden_size)).astype(np.float32)
    got = decoder.forward_hidden(fresh, model.new_cache(1, 32, block_size=BLOCK), [0], [0]).numpy()
    assert relative_error(got, eager(rounded, fresh, rounded.new_cache(1, 32, block_size=BLOCK), [0], [0])) < tolerance
    errors.append(relative_error(got, eager(model, fresh, model.new_cache(1, 32, block_size=BLOCK), [0], [0])))
    assert 1e-4 < max(errors) < LOSSY_BOUNDS[precision]  # lossy (prefill checked too), but not by more than measured


def test_bf16_runs_only_where_the_cpu_has_it(model):
    if "BF16" in cpu_capabilities():
        decoder = CpuDecoder(model, threads=2, precision="bf16")
        embeds = np.random.default_rng(15).standard_normal((2, 1, model.config.hidden_size)).astype(np.float32)
        want = eager(model, embeds, model.new_cache(2, 8), [0, 1], [0, 0])
        assert relative_error(decoder.forward_hidden(embeds, model.new_cache(2, 8), [0, 1], [0, 0]).numpy(), want) < 0.05
    else:
        with pytest.raises(PrecisionUnavailable, match="bfloat16 arithmetic"):
            check_precision("bf16")
        with pytest.raises(PrecisionUnavailable, match="bfloat16"):
            CpuDecoder(model, threads=2, precision="bf16")
    with pytest.raises(PrecisionUnavailable, match="choose one of exact, int8, int4, bf16"):
        check_precision("fp8")


@pytest.mark.parametrize("starts", [(0, 0), (11, 3)])
def test_long_prompts_go_through_in_chunks(model, engine, monkeypatch, starts):
    """More rows than MAX_CALL_ROWS go through each program in several calls (bounding the programs' buffers):
    the same hidden states and cache as one call."""
    import model.cpu_decoder as cpu_decoder

    monkeypatch.setattr(cpu_decoder, "MAX_CALL_ROWS", 8)
    lengths = {2: starts[0], 3: starts[1]}
    eager_cache, engine_cache = prefilled_caches(model, {s: n for s, n in lengths.items() if n}, seed=16)
    embeds = np.random.default_rng(17).standard_normal((2, 30, model.config.hidden_size)).astype(np.float32)
    want = eager(model, embeds, eager_cache, [2, 3], list(starts))
    got = engine.forward_hidden(embeds, engine_cache, [2, 3], list(starts)).numpy()
    assert relative_error(got, want) < TOLERANCE
    for a, b in zip(eager_cache.k + eager_cache.v, engine_cache.k + engine_cache.v):
        assert relative_error(b.numpy(), a.numpy()) < TOLERANCE
