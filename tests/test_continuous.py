"""Continuous batching (through fewer decode slots than rows, a finished row's slot taking the next
sample) and the static sampler's shrinking batch give the static sampler's samples for the same key."""

import jax
import numpy as np
import pytest
from conftest import left_padded_batch, random_hf_model

from sail_jax.models import load_pretrained
from sail_jax.sampling import compile_counts, generate

PAD = 0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    hf = random_hf_model("LlamaForCausalLM", seed=2)
    path = str(tmp_path_factory.mktemp("m") / "model")
    hf.save_pretrained(path)
    return load_pretrained(path)


# A tenth of the vocabulary ends a row: lengths vary from 1 token to the budget, as real samples do.
EOS = list(range(1, 11))


@pytest.mark.parametrize("temperature,top_k,top_p,slots", [(1.0, 0, 1.0, 3), (0.8, 20, 0.9, 5), (0.0, 0, 1.0, 4)])
def test_slots_give_the_static_samplers_samples_for_the_same_key(tiny_model, temperature, top_k, top_p, slots):
    ids, mask = left_padded_batch(97, batch=4, length=9, seed=4, pad_id=PAD)
    kw = dict(max_new_tokens=24, temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=EOS, num_samples=3,
              pad_id=PAD)
    static = generate(tiny_model, ids, mask, jax.random.PRNGKey(7), **kw)
    before = compile_counts().get("continuous", 0)
    slotted = generate(tiny_model, ids, mask, jax.random.PRNGKey(7), slots=slots, **kw)
    assert compile_counts().get("continuous", 0) == before + 1  # it did decode through the slots
    lengths = np.asarray(static.lengths)
    if temperature:
        assert lengths.min() < 6 and lengths.max() > 15  # lengths vary: slots were handed over
    for name in ("tokens", "mask", "lengths", "finished"):
        np.testing.assert_array_equal(np.asarray(getattr(slotted, name)), np.asarray(getattr(static, name)), name)
    np.testing.assert_allclose(np.asarray(slotted.logprobs), np.asarray(static.logprobs), atol=1e-5)


def test_one_slot_decodes_the_queue_one_sample_after_another(tiny_model):
    ids, mask = left_padded_batch(97, batch=2, length=6, seed=5, pad_id=PAD)
    kw = dict(max_new_tokens=12, temperature=1.0, eos_ids=EOS, num_samples=2, pad_id=PAD)
    static = generate(tiny_model, ids, mask, jax.random.PRNGKey(3), **kw)
    single = generate(tiny_model, ids, mask, jax.random.PRNGKey(3), slots=1, **kw)
    np.testing.assert_array_equal(np.asarray(single.tokens), np.asarray(static.tokens))
    with pytest.raises(ValueError, match="slots >= 0"):
        generate(tiny_model, ids, mask, jax.random.PRNGKey(3), slots=-1, **kw)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 20, 0.9), (0.0, 0, 1.0)])
def test_a_shrinking_batch_gives_the_static_samplers_samples(tiny_model, temperature, top_k, top_p, monkeypatch):
    """When at most half the rows are still going, the static sampler decodes them as a batch half the
    size: the samples are those of the batch decoded whole, bit for bit."""
    from sail_jax import sampling

    ids, mask = left_padded_batch(97, batch=4, length=9, seed=4, pad_id=PAD)
    kw = dict(max_new_tokens=24, temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=EOS, num_samples=4,
              pad_id=PAD)
    whole = generate(tiny_model, ids, mask, jax.random.PRNGKey(7), shrink=False, **kw)
    sizes, decode = [], sampling._decode
    monkeypatch.setattr(sampling, "_decode", lambda *a, **k: (sizes.append(len(a[9])), decode(*a, **k))[1])
    shrunk = generate(tiny_model, ids, mask, jax.random.PRNGKey(7), **kw)
    if temperature:
        assert sizes[:2] == [16, 8], sizes  # the batch did shrink
    for name in ("tokens", "mask", "lengths", "finished"):
        np.testing.assert_array_equal(np.asarray(getattr(shrunk, name)), np.asarray(getattr(whole, name)), name)
    np.testing.assert_allclose(np.asarray(shrunk.logprobs), np.asarray(whole.logprobs), atol=1e-5)
