"""The batched sampler (model/sampling.py) against a row-by-row numpy reference of its definition."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from model.sampling import RowParams, SamplingParams, cfg, penalize, philox4x32, reference_draw, sample, uniforms

# Random123's known answers for Philox4x32-10 (its kat_vectors)
PHILOX_KNOWN = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_philox_gives_random123s_known_answers():
    counters = np.array([c for c, _, _ in PHILOX_KNOWN], np.uint64)
    keys = np.array([k for _, k, _ in PHILOX_KNOWN], np.uint64)
    np.testing.assert_array_equal(philox4x32(counters, keys), np.array([o for _, _, o in PHILOX_KNOWN], np.uint32))
    for counter, key, out in PHILOX_KNOWN:  # one at a time as in a batch
        np.testing.assert_array_equal(philox4x32(np.array(counter), np.array(key)), np.array(out, np.uint32))


def test_uniforms_depend_on_seed_and_step_alone():
    seeds = np.array([0, 1, 2**63 - 1, 12345, 12345], np.uint64)
    steps = np.array([0, 0, 7, 575, 2**40], np.uint64)
    batch = uniforms(seeds, steps)
    alone = [uniforms([s], [t])[0] for s, t in zip(seeds, steps)]
    np.testing.assert_array_equal(batch, alone)
    assert batch.dtype == np.float32 and len(set(batch.tolist())) == 5
    many = uniforms(np.full(20000, 42, np.uint64), np.arange(20000))
    assert many.min() >= 0 and many.max() < 1
    assert abs(many.mean() - 0.5) < 0.01 and abs((many < 0.1).mean() - 0.1) < 0.01


def run(logits: np.ndarray, params: list[SamplingParams], u: np.ndarray) -> np.ndarray:
    return sample(paddle.to_tensor(logits), RowParams.of(params, u)).numpy()


CASES = [SamplingParams(), SamplingParams(1.0), SamplingParams(0.7, top_k=5), SamplingParams(1.3, top_p=0.8),
         SamplingParams(1.0, top_k=50, top_p=0.9), SamplingParams(0.05), SamplingParams(2.0, top_k=1),
         SamplingParams(1.0, top_p=0.0), SamplingParams(1.0, top_k=100000)]


def test_each_row_draws_from_its_kept_tokens_by_its_uniform():
    rng = np.random.default_rng(0)
    for trial in range(20):
        vocab = int(rng.choice([7, 300, 16384]))
        params = [CASES[i] for i in rng.integers(0, len(CASES), 6)]
        logits = (rng.standard_normal((6, vocab)) * rng.choice([0.5, 3.0, 10.0])).astype(np.float32)
        u = uniforms(rng.integers(0, 2**62, 6, dtype=np.uint64), np.full(6, trial))
        tokens = run(logits, params, u)
        assert tokens.dtype == np.int64
        for row, (token, p) in enumerate(zip(tokens, params)):
            assert reference_draw(logits[row], p, float(u[row]), int(token)), (trial, row, p)
            if p.temperature > 0:  # and not another token beside it
                assert not reference_draw(logits[row], p, float(u[row]), int(token) + 1, slack=0)


def test_a_row_draws_the_same_alone_or_beside_others():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((len(CASES), 1000)).astype(np.float32) * 3
    u = uniforms(np.arange(len(CASES)), np.zeros(len(CASES)))
    together = run(logits, CASES, u)
    alone = [run(logits[i:i + 1], [CASES[i]], u[i:i + 1])[0] for i in range(len(CASES))]
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(run(logits, CASES, u), together)  # and again


def test_draws_follow_the_probabilities():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    count = 20000
    tokens = run(np.tile(logits, (count, 1)), [SamplingParams(1.0)] * count, uniforms(np.full(count, 7), np.arange(count)))
    frequencies = np.bincount(tokens, minlength=4) / count
    np.testing.assert_allclose(frequencies, [0.5, 0.3, 0.15, 0.05], atol=0.01)
    # top_p 0.7 keeps the two most probable (0.5 + 0.3), renormalized
    tokens = run(np.tile(logits, (count, 1)), [SamplingParams(1.0, top_p=0.7)] * count,
                 uniforms(np.full(count, 8), np.arange(count)))
    np.testing.assert_allclose(np.bincount(tokens, minlength=4) / count, [0.625, 0.375, 0, 0], atol=0.01)


def test_greedy_and_cuts_keep_ties_whole():
    logits = np.array([[0.0, 5.0, 5.0, -3.0]], np.float32)
    assert run(logits, [SamplingParams()], np.zeros(1))[0] == 1  # the lowest id of the largest
    low, high = np.float32(0.1), np.float32(0.9)
    # top_k=1 keeps both tied tokens; u picks between them in id order
    assert run(logits, [SamplingParams(1.0, top_k=1)], np.array([low]))[0] == 1
    assert run(logits, [SamplingParams(1.0, top_k=1)], np.array([high]))[0] == 2
    assert run(logits, [SamplingParams(1.0, top_p=0.1)], np.array([high]))[0] == 2
    last = uniforms([3], [0])  # any u: never a token outside the cut
    assert run(logits, [SamplingParams(0.01)], last)[0] in (1, 2)


def test_a_uniform_at_the_top_stays_on_a_kept_token():
    logits = np.array([[1.0, 2.0, -np.inf, -np.inf]], np.float32)
    top = np.array([np.float32(1) - np.float32(2.0 ** -24)])
    assert run(logits, [SamplingParams(1.0)], top)[0] == 1


def test_penalties_follow_openais_definition():
    logits = paddle.zeros([2, 6])
    counts = paddle.to_tensor(np.array([[0, 0, 2, 0, 0, 1], [0, 0, 0, 1, 0, 0]], np.float32))
    rows = RowParams.of([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
                         SamplingParams(presence_penalty=-1.0)], np.zeros(2))
    np.testing.assert_array_equal(penalize(logits, counts, rows).numpy(),
                                  [[0, 0, -1.0, 0, 0, -0.75], [0, 0, 0, 1.0, 0, 0]])
    plain = RowParams.of([SamplingParams(), SamplingParams(1.0)], np.zeros(2))
    assert penalize(logits, counts, plain) is logits


@pytest.mark.parametrize("weight", [5.0, 1.0])
def test_cfg_is_the_references_expression_in_float32(weight):
    rng = np.random.default_rng(2)
    cond, uncond = (rng.standard_normal((3, 50)).astype(np.float32) for _ in range(2))
    guided = cfg(paddle.to_tensor(cond), paddle.to_tensor(uncond), weight)
    assert guided.dtype == paddle.float32
    np.testing.assert_array_equal(guided.numpy(), uncond + np.float32(weight) * (cond - uncond))
