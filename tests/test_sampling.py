"""The jitted KV-cache sampler: greedy parity with transformers, sampling statistics, log-probs, meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import left_padded_batch, random_hf_model
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sail_jax.logprobs import token_logprobs
from sail_jax.models import load_pretrained
from sail_jax.sampling import (GeometricMixture, bucket, categorical_from_uniform, compile_counts, filter_logits,
                               generate)

PAD = 0


def _hf_greedy(hf, ids, mask, max_new, eos):
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(), do_sample=False,
                          max_new_tokens=max_new, eos_token_id=eos, pad_token_id=PAD)
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("cls_name,overrides", [("LlamaForCausalLM", {}), ("Qwen2ForCausalLM", {"tie_word_embeddings": True})])
def test_greedy_equals_transformers_generate_with_left_padding_and_eos(cls_name, overrides, save_hf):
    hf = random_hf_model(cls_name, **overrides)
    model = load_pretrained(save_hf(hf))
    ids, mask = left_padded_batch(97, batch=3, length=7, seed=3, pad_id=PAD)
    free = generate(model, ids, mask, jax.random.PRNGKey(0), max_new_tokens=10, temperature=0.0, eos_ids=[PAD + 96],
                    pad_id=PAD)
    eos = int(free.tokens[0, 2])  # the token row 0 emits at step 3 becomes EOS: row 0 stops there
    ours = generate(model, ids, mask, jax.random.PRNGKey(0), max_new_tokens=10, temperature=0.0, eos_ids=eos, pad_id=PAD)
    ref = _hf_greedy(hf, ids, mask, 10, eos)
    assert bool(ours.finished[0]) and int(ours.lengths[0]) <= 3
    got = np.asarray(ours.tokens)
    np.testing.assert_array_equal(got[:, :ref.shape[1]], ref)
    assert np.all(got[:, ref.shape[1]:] == PAD)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    hf = random_hf_model("LlamaForCausalLM", seed=1)
    path = str(tmp_path_factory.mktemp("m") / "model")
    hf.save_pretrained(path)
    return load_pretrained(path)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 10, 1.0), (1.0, 0, 0.8), (1.3, 20, 0.9)])
def test_first_token_frequencies_match_the_filtered_softmax(tiny_model, temperature, top_k, top_p):
    ids, mask = left_padded_batch(97, batch=1, length=5, seed=4)
    n = 20000
    out = generate(tiny_model, ids, mask, jax.random.PRNGKey(1), max_new_tokens=1, temperature=temperature,
                   top_k=top_k, top_p=top_p, eos_ids=[96], num_samples=n)
    logits = tiny_model(jnp.asarray(ids), jnp.asarray(mask))[0, -1]
    expected = np.asarray(jax.nn.softmax(filter_logits(logits[None], temperature, top_k, top_p < 1, top_p)))[0]
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=97)
    assert counts[expected == 0].sum() == 0  # filtered tokens are never drawn
    freq = counts / n
    tolerance = 4.5 * np.sqrt(expected * (1 - expected) / n) + 1e-9
    np.testing.assert_array_less(np.abs(freq - expected), tolerance)
    # The returned log-prob is that of the sampled token under the sampling distribution.
    np.testing.assert_allclose(out.logprobs[:, 0], np.log(expected[np.asarray(out.tokens[:, 0])]), rtol=1e-4, atol=1e-5)


def test_two_level_sampler_draws_the_softmax_and_never_a_masked_token():
    vocab, n = 300, 40000  # 10 blocks of 32 tokens, the last one padded
    logits = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (vocab,))
    masked = np.r_[32:64, 95, 96, 299]  # a whole block, both sides of a block boundary, the last token
    logits = logits.at[masked].set(-jnp.inf)
    tokens, logprobs = categorical_from_uniform(jax.random.uniform(jax.random.PRNGKey(1), (n,)),
                                                jnp.broadcast_to(logits, (n, vocab)))
    expected = np.asarray(jax.nn.softmax(logits))
    counts = np.bincount(np.asarray(tokens), minlength=vocab)
    assert counts[masked].sum() == 0
    tolerance = 4.5 * np.sqrt(expected * (1 - expected) / n) + 1e-9
    np.testing.assert_array_less(np.abs(counts / n - expected), tolerance)
    np.testing.assert_allclose(logprobs, np.log(expected[np.asarray(tokens)]), rtol=1e-5, atol=1e-6)
    # One surviving token (top-k = 1 after filtering) is drawn every time.
    only = jnp.full((4, vocab), -jnp.inf).at[:, 170].set(0.0)
    assert np.all(np.asarray(categorical_from_uniform(jax.random.uniform(jax.random.PRNGKey(2), (4,)), only)[0]) == 170)


def test_logprobs_equal_a_full_forward_recomputation(tiny_model):
    ids, mask = left_padded_batch(97, batch=2, length=6, seed=5)
    out = generate(tiny_model, ids, mask, jax.random.PRNGKey(2), max_new_tokens=9, temperature=0.8,
                   eos_ids=[5, 6], num_samples=3, pad_id=PAD)
    assert out.tokens.shape == (6, 9) and out.logprobs.shape == (6, 9)
    full_ids = np.concatenate([np.repeat(ids, 3, axis=0), np.asarray(out.tokens)], axis=1)
    full_mask = np.concatenate([np.repeat(mask, 3, axis=0), np.asarray(out.mask)], axis=1)
    logits = tiny_model(jnp.asarray(full_ids), jnp.asarray(full_mask))
    recomputed = token_logprobs(logits[:, 5:-1], jnp.asarray(full_ids[:, 6:]), temperature=0.8)
    valid = np.asarray(out.mask).astype(bool)
    np.testing.assert_allclose(np.asarray(out.logprobs)[valid], np.asarray(recomputed)[valid], atol=2e-5)
    # mask = 1 up to and including the first EOS; pad after it.
    for row in range(6):
        toks, n = np.asarray(out.tokens[row]), int(out.lengths[row])
        hits = np.flatnonzero(np.isin(toks[:n], [5, 6]))
        assert bool(out.finished[row]) == (len(hits) > 0)
        if len(hits):
            assert hits[0] == n - 1 and np.all(toks[n:] == PAD)


def test_same_key_same_samples_and_bucketed_shapes_reuse_compiles(tiny_model):
    kwargs = dict(max_new_tokens=6, temperature=1.0, eos_ids=[96], num_samples=2)
    ids, mask = left_padded_batch(97, batch=2, length=5, seed=6)
    a = generate(tiny_model, ids, mask, jax.random.PRNGKey(3), **kwargs)
    before = compile_counts()
    b = generate(tiny_model, ids, mask, jax.random.PRNGKey(3), **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    c = generate(tiny_model, ids, mask, jax.random.PRNGKey(4), **kwargs)
    assert not np.array_equal(a.tokens, c.tokens)
    ids7, mask7 = left_padded_batch(97, batch=2, length=7, seed=6)  # same prompt bucket (8)
    generate(tiny_model, ids7, mask7, jax.random.PRNGKey(3), **{**kwargs, "max_new_tokens": 7})  # same budget (8)
    assert compile_counts() == before
    assert bucket(5) == 8 and bucket(9) == 16 and bucket(64) == 64


def test_eight_device_mesh_gives_the_same_samples(tiny_model):
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    ids, mask = left_padded_batch(97, batch=8, length=6, seed=7)
    kwargs = dict(max_new_tokens=8, temperature=0.9, top_p=0.95, eos_ids=[3], num_samples=2)
    single = generate(tiny_model, ids, mask, jax.random.PRNGKey(5), **kwargs)
    sharded = generate(tiny_model, ids, mask, jax.random.PRNGKey(5), batch_sharding=NamedSharding(mesh, P("data")),
                       **kwargs)
    assert len(sharded.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(single.tokens, sharded.tokens)
    np.testing.assert_allclose(single.logprobs, sharded.logprobs, atol=1e-5)


def test_bad_sampling_arguments_are_named(tiny_model):
    ids, mask = left_padded_batch(97, batch=1, length=4)
    with pytest.raises(ValueError, match="top_p=1.5"):
        generate(tiny_model, ids, mask, jax.random.PRNGKey(0), max_new_tokens=2, top_p=1.5, eos_ids=[1])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(tiny_model, ids, mask, jax.random.PRNGKey(0), max_new_tokens=0, eos_ids=[1])


@pytest.fixture(scope="module")
def mixture_pair(tmp_path_factory):
    """Two different tiny models: a policy and a reference."""
    out = []
    for seed in (0, 1):
        hf = random_hf_model("LlamaForCausalLM", seed=seed)
        path = str(tmp_path_factory.mktemp("m") / "model")
        hf.save_pretrained(path)
        out.append(load_pretrained(path))
    return out


@pytest.mark.parametrize("coef", [0.0, 0.3, 1.0])
def test_geometric_mixture_draws_the_normalised_product_of_the_two_models(mixture_pair, coef):
    """Nash-MD's mixture sampler: first tokens follow softmax((1 − m)·z_π + m·z_ref) (frequencies over
    20k draws, at temperature 0.9), and every token's returned log-prob equals that mixture's, recomputed
    by full forwards of both models along the sampled responses (so the decode loop feeds each model
    its own cache). m = 0 is the policy and m = 1 the reference, draw for draw."""
    policy, reference = mixture_pair
    mixture = GeometricMixture(policy, reference, coef)
    ids, mask = left_padded_batch(97, batch=1, length=5, seed=4)
    n, t = 20000, 0.9
    out = generate(mixture, ids, mask, jax.random.PRNGKey(1), max_new_tokens=1, temperature=t, eos_ids=[96],
                   num_samples=n)
    logits = [m(jnp.asarray(ids), jnp.asarray(mask))[0, -1] for m in (policy, reference)]
    expected = np.asarray(jax.nn.softmax(((1 - coef) * logits[0] + coef * logits[1]) / t))
    freq = np.bincount(np.asarray(out.tokens[:, 0]), minlength=97) / n
    np.testing.assert_array_less(np.abs(freq - expected), 4.5 * np.sqrt(expected * (1 - expected) / n) + 1e-9)

    ids, mask = left_padded_batch(97, batch=2, length=6, seed=5)
    out = generate(mixture, ids, mask, jax.random.PRNGKey(2), max_new_tokens=9, temperature=t, eos_ids=[5],
                   num_samples=3, pad_id=PAD)
    full_ids = np.concatenate([np.repeat(ids, 3, axis=0), np.asarray(out.tokens)], axis=1)
    full_mask = np.concatenate([np.repeat(mask, 3, axis=0), np.asarray(out.mask)], axis=1)
    z = [m(jnp.asarray(full_ids), jnp.asarray(full_mask))[:, 5:-1] for m in (policy, reference)]
    recomputed = token_logprobs((1 - coef) * z[0] + coef * z[1], jnp.asarray(full_ids[:, 6:]), temperature=t)
    valid = np.asarray(out.mask).astype(bool)
    np.testing.assert_allclose(np.asarray(out.logprobs)[valid], np.asarray(recomputed)[valid], atol=2e-5)
    if coef in (0.0, 1.0):
        alone = generate(policy if coef == 0 else reference, ids, mask, jax.random.PRNGKey(2), max_new_tokens=9,
                         temperature=t, eos_ids=[5], num_samples=3, pad_id=PAD)
        np.testing.assert_array_equal(np.asarray(alone.tokens), np.asarray(out.tokens))
