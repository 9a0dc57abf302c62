"""Length buckets and batch order: a batch cut to its bucket gives the padded batch's losses and
gradients; grouped and ordered iterators are deterministic, resumable and the same across processes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import synthetic_pairs
from flax import nnx

from sail_jax.configs import base_config, sail_config
from sail_jax.data.buckets import NO_BUCKETS, Buckets, ShapeLog, row_lengths, trim
from sail_jax.data.pipeline import encode_online, encode_preference, encode_sft, eval_batches, train_iterator
from sail_jax.data.records import Records
from sail_jax.errors import UserError
from sail_jax.models import load_pretrained
from sail_jax.objectives import make_dpo_objective, make_sail_objective, sft_objective
from sail_jax.sail_terms import ROUTE_OFFLINE, ROUTE_PP, ROUTE_PR, RunningBaseline
from sail_jax.tokenization import Tokenizer


def test_bucket_lengths():
    pow2, every64, none = Buckets.parse("pow2", 16), Buckets.parse("64", 16), Buckets.parse("none")
    half = Buckets.parse("pow2_half", 16)
    assert [pow2.length(n, 1024) for n in (0, 1, 16, 17, 100, 513, 2000)] == [16, 16, 16, 32, 128, 1024, 1024]
    assert [half.length(n, 1024) for n in (1, 16, 17, 24, 25, 33, 49, 65, 100, 513, 769)] == \
        [16, 16, 24, 24, 32, 48, 64, 96, 128, 768, 1024]
    assert Buckets.from_config(base_config("dpo").data) == half  # the default
    assert [every64.length(n, 1000) for n in (1, 64, 65, 999)] == [64, 64, 128, 1000]
    assert none.length(3, 48) == 48
    assert pow2.length(5, 12) == 12  # never over the cap
    for bad in ("pow3", "0", "-8", ""):
        with pytest.raises(UserError, match="config.data.buckets"):
            Buckets.parse(bad)


def _long_tailed_pairs(n, seed=0):
    """Pairs whose lengths vary a lot (a few long rows), as real preference data does."""
    rng = np.random.RandomState(seed)
    rows = synthetic_pairs(n, seed)
    for r in rows:
        r["chosen"] += " red" * int(rng.choice([0, 1, 3, 12]))
    return rows


def _grads(objective, model, batch, frozen):
    graphdef, params = nnx.split(model)

    def loss(p):
        return objective(nnx.merge(graphdef, p), batch, frozen, jax.random.key(0))

    return jax.value_and_grad(loss, has_aux=True)(params)


def _assert_same_loss_and_grads(objective, model, padded, frozen=None):
    cut = trim(padded, Buckets.parse("8", 1))
    assert any(cut[k].shape != padded[k].shape for k in padded), "nothing was cut: the test would prove nothing"
    (loss_p, metrics_p), grads_p = _grads(objective, model, jax.tree.map(jnp.asarray, padded), frozen)
    (loss_c, metrics_c), grads_c = _grads(objective, model, jax.tree.map(jnp.asarray, cut), frozen)
    assert abs(float(loss_p) - float(loss_c)) <= 1e-6 * max(1.0, abs(float(loss_p)))
    chex.assert_trees_all_close(metrics_c, metrics_p, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(grads_c, grads_p, atol=1e-6, rtol=1e-5)


def test_bucketed_dpo_batch_gives_the_padded_batchs_loss_and_gradients(tiny_checkpoint):
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    arrays = encode_preference(Records(_long_tailed_pairs(8)), tokenizer, max_prompt_length=64, max_length=160).arrays
    model = load_pretrained(tiny_checkpoint)
    config = base_config("dpo")
    reference = jax.tree.map(lambda x: x * 1.01, nnx.state(model))  # h != 0: a gradient worth comparing
    objective = make_dpo_objective(config.loss, nnx.graphdef(model), "model")
    _assert_same_loss_and_grads(objective, model, dict(arrays), {"reference": reference})


def test_bucketed_sft_batch_gives_the_padded_batchs_loss_and_gradients(tiny_checkpoint):
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    rows = [{"prompt": r["prompt"], "response": r["chosen"]} for r in _long_tailed_pairs(8, seed=1)]
    arrays = encode_sft(Records(rows), tokenizer, max_prompt_length=64, max_length=160).arrays
    _assert_same_loss_and_grads(sft_objective, load_pretrained(tiny_checkpoint), dict(arrays))


def test_bucketed_online_batch_gives_the_padded_batchs_sail_loss_and_gradients(tiny_checkpoint):
    """Prompts cut on the left, responses on the right; PP rows carry the score-function term."""
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    enc = encode_online(Records(_long_tailed_pairs(8, seed=2)), tokenizer, max_prompt_length=64,
                        max_response_length=96)
    batch = {k: v for k, v in enc.arrays.items() if k != "index"}
    rng = np.random.RandomState(0)
    batch["ref_chosen_logps"] = rng.uniform(-30, -10, 8).astype(np.float32)
    batch["ref_rejected_logps"] = rng.uniform(-30, -10, 8).astype(np.float32)
    batch["route"] = np.array([ROUTE_PP, ROUTE_PR, ROUTE_OFFLINE, ROUTE_PP] * 2, np.int32)
    config = sail_config("sail_pp")
    objective = make_sail_objective(config.loss, config.sail)
    _assert_same_loss_and_grads(objective, load_pretrained(tiny_checkpoint), batch,
                                {"baseline": RunningBaseline.init()})


def _arrays(n=64, seed=0):
    rng = np.random.RandomState(seed)
    lengths = rng.choice([2, 3, 5, 40], size=n)
    mask = (np.arange(48)[None, :] < lengths[:, None]).astype(np.int32)
    return {"input_ids": np.arange(n)[:, None] * mask, "attention_mask": mask, "loss_mask": mask,
            "valid": np.ones(n, np.int32)}


def test_train_iterator_cuts_each_global_batch_alike_on_every_process():
    arrays = _arrays()
    buckets = Buckets.parse("pow2", 8)
    single = train_iterator(arrays, 8, seed=1, buckets=buckets)
    halves = [train_iterator(arrays, 4, seed=1, buckets=buckets, process_index=p, process_count=2) for p in (0, 1)]
    widths = set()
    for _ in range(12):
        whole, parts = next(single), [next(h) for h in halves]
        for k in whole:
            np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))
        longest = int(whole["attention_mask"].sum(1).max())
        assert whole["input_ids"].shape[1] == buckets.length(longest, 48) >= longest
        widths.add(whole["input_ids"].shape[1])
    assert len(widths) > 1


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cut_to_the_global_batchs_width(process_count):
    arrays = _arrays(21)
    buckets = Buckets.parse("pow2", 4)
    per_process = [eval_batches(arrays, 4, process_index=p, process_count=process_count, buckets=buckets)
                   for p in range(process_count)]
    uncut = [eval_batches(arrays, 4, process_index=p, process_count=process_count) for p in range(process_count)]
    for i in range(len(per_process[0])):
        widths = {b[i]["input_ids"].shape[1] for b in per_process}
        assert len(widths) == 1  # the same global array width on every process
        for cut, full in zip(per_process, uncut):  # nothing real is lost
            w = cut[i]["input_ids"].shape[1]
            np.testing.assert_array_equal(cut[i]["input_ids"], full[i]["input_ids"][:, :w])
            assert full[i]["attention_mask"][:, w:].sum() == 0


def test_group_by_length_batches_similar_rows_deterministically_and_resumes():
    arrays = _arrays(256)
    lengths = row_lengths(arrays)
    grouped = train_iterator(arrays, 8, seed=3, group_by_length=True, group_window=8)
    plain = train_iterator(arrays, 8, seed=3)
    spread = lambda it: np.mean([np.ptp(lengths[next(it)["input_ids"][:, 0]]) for _ in range(64)])  # noqa: E731
    assert spread(grouped) < 0.25 * spread(plain)
    # Every row once per epoch (32 batches of 8 = 256 rows), and the same batches for the same seed.
    a, b = train_iterator(arrays, 8, seed=3, group_by_length=True), train_iterator(arrays, 8, seed=3,
                                                                                   group_by_length=True)
    epoch = [next(a)["input_ids"][:, 0] for _ in range(32)]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(256))
    for batch in epoch:
        np.testing.assert_array_equal(next(b)["input_ids"][:, 0], batch)
    state = a.get_state()
    after = [next(a)["input_ids"][:, 0] for _ in range(5)]
    a.set_state(state)
    for batch in after:
        np.testing.assert_array_equal(next(a)["input_ids"][:, 0], batch)
    other_seed = train_iterator(arrays, 8, seed=4, group_by_length=True)
    assert any((next(other_seed)["input_ids"][:, 0] != batch).any() for batch in epoch[:4])


def test_shuffle_false_serves_rows_in_order_every_epoch():
    arrays = _arrays(20)
    it = train_iterator(arrays, 8, seed=0, shuffle=False)
    rows = np.concatenate([next(it)["input_ids"][:, 0] for _ in range(5)])
    np.testing.assert_array_equal(rows, np.arange(40) % 20)
    with pytest.raises(UserError, match="group_by_length"):
        train_iterator(arrays, 8, seed=0, shuffle=False, group_by_length=True)


def test_shape_log_counts_distinct_shapes_and_padding():
    log = ShapeLog()
    arrays = _arrays(8)
    assert log.metrics(arrays)["batch/shapes"] == 1.0
    cut = trim(arrays, Buckets.parse("8", 1))
    assert cut["input_ids"].shape[1] < arrays["input_ids"].shape[1]
    m = log.metrics(cut)
    assert m["batch/shapes"] == 2.0 and log.metrics(cut)["batch/shapes"] == 2.0
    assert m["batch/pad_fraction"] == pytest.approx(1 - arrays["attention_mask"].sum() / cut["attention_mask"].size)
    assert trim(arrays, NO_BUCKETS)["input_ids"].shape == arrays["input_ids"].shape


def test_evaluation_with_buckets_equals_the_padded_evaluation(tiny_checkpoint):
    """Each chunk's samples are cut to their own bucket for the log-prob passes; chunks whose longest
    samples differ must still join into one table, with the metrics of the uncut evaluation."""
    import types

    import ml_collections

    from sail_jax.evaluate import Evaluator

    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    # a third of the vocabulary ends a sample, so the chunks' longest samples (and buckets) differ
    ends = types.SimpleNamespace(eos_id=list(range(3, 48)), pad_id=tokenizer.pad_id, decode=tokenizer.decode)
    rows = synthetic_pairs(6, seed=3)
    arrays = encode_online(Records(rows), tokenizer, max_prompt_length=64, max_response_length=24,
                           prompts_only=True).arrays
    graphdef, params = nnx.split(load_pretrained(tiny_checkpoint))
    gen = ml_collections.ConfigDict({"max_new_tokens": 24, "slots": 0})

    def evaluate(buckets):
        ev = Evaluator(graphdef, (graphdef, params), prompts=[r["prompt"] for r in rows], eval_arrays=arrays,
                       reward_source=lambda p, r: np.asarray([len(t) for t in r], np.float32), tokenizer=ends,
                       gen_cfg=gen, beta=0.1, batch_size=2, seed=0, buckets=buckets)
        return ev, ev(params)

    cut, metrics = evaluate(Buckets.parse("4", 1))
    _, padded = evaluate(NO_BUCKETS)
    longest = cut.last["mask"].reshape(3, 2, -1).sum(-1).max(-1)
    assert len({Buckets.parse("4", 1).length(int(n), 24) for n in longest}) > 1, "one bucket: nothing tested"
    chex.assert_trees_all_close(metrics, padded, atol=1e-5, rtol=1e-5)
