"""The blockwise causal attention equals the dense attention it replaces: values and gradients, on
packed, left-padded and right-padded rows whose width the blocks do not divide."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sail_jax.models.attention import CAUSAL_BLOCK, causal_attention, dot_product_attention, make_attention_mask


def _mask(valid, segments, window):
    slots = jnp.broadcast_to(jnp.arange(valid.shape[1]), valid.shape)
    positions = jnp.cumsum(valid, axis=1) - 1
    allowed = make_attention_mask(positions, positions, slots, slots, valid, window)
    return allowed & (segments[:, :, None] == segments[:, None, :])


@pytest.mark.parametrize("width,window", [(2 * CAUSAL_BLOCK + 44, None), (5 * CAUSAL_BLOCK + 9, 50)])
def test_blockwise_causal_attention_equals_the_dense_attention(width, window):
    b, heads, kv, d = 3, 4, 2, 8
    kq, kk, kvv, kc = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (b, width, heads, d))
    k = jax.random.normal(kk, (b, kv, width, d))
    v = jax.random.normal(kvv, (b, kv, d, width))
    valid = np.ones((b, width), bool)
    valid[1, :width // 2 + 3] = False  # left padding over more than a block
    valid[2, width - 70:] = False  # right padding
    segments = np.ones((b, width), np.int32)
    segments[0, 100:] = 2  # packed: three sequences in row 0
    segments[0, width - 30:] = 3
    mask = _mask(jnp.asarray(valid), jnp.asarray(segments), window)
    cot = jax.random.normal(kc, q.shape) * valid[:, :, None, None]  # the loss reads real queries only

    def loss(attend, q, k, v):
        return jnp.sum(attend(q, k, v, mask) * cot)

    dense, dense_grads = jax.value_and_grad(lambda *a: loss(dot_product_attention, *a), (0, 1, 2))(q, k, v)
    block, block_grads = jax.value_and_grad(lambda *a: loss(causal_attention, *a), (0, 1, 2))(q, k, v)
    out_dense, out_block = dot_product_attention(q, k, v, mask), causal_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out_block)[valid], np.asarray(out_dense)[valid], atol=1e-6, rtol=0)
    np.testing.assert_allclose(block, dense, atol=1e-5)  # a sum of ~10^4 terms: summation order
    for got, want in zip(block_grads, dense_grads):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert jnp.isfinite(out_block).all()  # fully masked (padding) queries stay finite
