"""Log-probs from logits: exact against a direct log-softmax, chunked == unchunked, alignment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sail_jax.logprobs import sequence_logprobs, token_logprobs
from sail_jax.tokenization import EncodedPair, pack_pairs


def _logits(shape, dtype=jnp.float32, seed=0):
    return (3.0 * jax.random.normal(jax.random.PRNGKey(seed), shape)).astype(dtype)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_log_softmax(temperature):
    logits = _logits((2, 5, 11))
    targets = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, 11)
    expected = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits / temperature)), np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_logprobs(logits, targets, temperature=temperature), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_vocab_chunking_equals_unchunked_values_and_gradients(dtype):
    logits = _logits((3, 4, 37), dtype)  # 37 is not a multiple of the chunk size
    targets = jax.random.randint(jax.random.PRNGKey(2), (3, 4), 0, 37)
    full = token_logprobs(logits, targets, temperature=0.9)
    chunked = token_logprobs(logits, targets, temperature=0.9, vocab_chunk_size=8)
    assert full.dtype == chunked.dtype == jnp.float32
    np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-5)
    f = lambda chunk: jax.grad(lambda x: token_logprobs(x, targets, vocab_chunk_size=chunk).sum())(logits.astype(jnp.float32))
    np.testing.assert_allclose(f(8), f(None), atol=1e-6)


def test_sequence_logprobs_sum_response_tokens_only():
    pairs = [EncodedPair([1, 2], [3, 4, 5]), EncodedPair([6], [7])]
    batch = pack_pairs(pairs, length=6, pad_id=0)
    logits = _logits((2, 6, 9))
    logps, lengths = sequence_logprobs(logits, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["loss_mask"]))
    lsm = np.asarray(jax.nn.log_softmax(logits))
    # Token t is predicted by the logits at t - 1.
    expected = [lsm[0, 1, 3] + lsm[0, 2, 4] + lsm[0, 3, 5], lsm[1, 0, 7]]
    np.testing.assert_allclose(logps, expected, rtol=1e-6)
    np.testing.assert_array_equal(lengths, [3, 1])
    empty, n = sequence_logprobs(logits, jnp.asarray(batch["input_ids"]), jnp.zeros((2, 6), jnp.int32))
    np.testing.assert_array_equal(empty, [0, 0])
    np.testing.assert_array_equal(n, [0, 0])


def test_non_positive_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(_logits((1, 2, 3)), jnp.zeros((1, 2), jnp.int32), temperature=0.0)
