"""The SAIL online loop: labels follow their laws (frequency tests), the per-route loss is sail_loss,
the built-in task's oracle, and the main job improving the oracle reward over SFT."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import main_job_variant, online_loop, synthetic_pairs
from flax import nnx

from sail_jax.configs import VARIANTS, sail_config
from sail_jax.labeling import dp_swaps, draw_routes, preference_labels, select_pairs
from sail_jax.sail_terms import ROUTE_DP, ROUTE_OFFLINE, ROUTE_PP, ROUTE_PR, RunningBaseline, sail_loss
from sail_jax.objectives import make_sail_objective, response_logps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _binomial_ok(hits, n, p, z=5.0):
    return abs(hits - n * p) <= z * np.sqrt(n * p * (1 - p)) + 1


def test_bt_sampled_labels_follow_sigmoid_of_the_score_gap():
    gaps = jnp.array([-2.0, -0.5, 0.0, 0.7, 3.0])
    n = 20000
    wins = np.zeros(5)
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(jax.vmap(lambda k: preference_labels(k, gaps, jnp.zeros(5), "sample")[0]))
    wins = np.asarray(draw(keys)).sum(0)
    for w, p in zip(wins, jax.nn.sigmoid(gaps)):
        assert _binomial_ok(w, n, float(p)), (w / n, float(p))


def test_dp_swaps_with_probability_one_minus_sigmoid_beta_h():
    h, beta, n = jnp.array([-10.0, 0.0, 5.0, 20.0]), 0.1, 20000
    keys = jax.random.split(jax.random.key(1), n)
    swaps = np.asarray(jax.jit(jax.vmap(lambda k: dp_swaps(k, h, beta)))(keys)).sum(0)
    for s, hv in zip(swaps, h):
        assert _binomial_ok(s, n, 1 - float(jax.nn.sigmoid(beta * hv)))


def test_argmax_labels_report_ties_and_routes_follow_their_probabilities():
    wins, ties = preference_labels(jax.random.key(0), jnp.array([1.0, 2.0, 3.0]), jnp.array([2.0, 2.0, 1.0]), "argmax")
    assert wins.tolist() == [False, False, True] and ties.tolist() == [False, True, False]
    routes = np.asarray(draw_routes(jax.random.key(2), 40000, p_dp=0.2, p_pp=0.3, p_pr=0.1))
    for route, p in ((ROUTE_DP, 0.2), (ROUTE_PP, 0.3), (ROUTE_PR, 0.1), (ROUTE_OFFLINE, 0.4)):
        assert _binomial_ok((routes == route).sum(), 40000, p)


def test_pair_selection_methods():
    scores = jnp.array([[0.1, 0.9, -0.5, 0.3]] * 50)
    a, b = select_pairs(jax.random.key(0), scores, "max_min")
    assert a[0] == 1 and b[0] == 2
    # All scores equal (self-labelling at π = π_ref: every implicit reward is 0): still two samples. Picking
    # one twice made an identical pair that was dropped, so SAIL-PP on SmolLM2 never left the reference.
    a, b = select_pairs(jax.random.key(0), jnp.zeros((3, 4)), "max_min")
    assert bool(jnp.all(a != b))
    a, b = select_pairs(jax.random.key(0), scores, "first_two")
    assert a[0] == 0 and b[0] == 1
    a, b = select_pairs(jax.random.key(0), scores, "random")
    assert bool(jnp.all(a != b)) and len(set(np.asarray(a).tolist())) > 1
    with pytest.raises(ValueError, match="valid: \\['first_two', 'max_min', 'random'\\]"):
        select_pairs(jax.random.key(0), scores, "best")


@pytest.fixture(scope="module")
def loop(tiny_checkpoint, tmp_path_factory):
    """An OnlineLoop on the tiny checkpoint and synthetic pairs (no training run)."""
    return online_loop(tiny_checkpoint, tmp_path_factory.mktemp("online"), (1, 1, 1))


def _label(loop, step, batch, samples):
    out, metrics = loop.label(step, batch, samples)
    return jax.device_get(out), metrics


def _host_labels(loop, step, batch, samples):
    """The labelling pass as the loop ran it on the host until 2026-11-30 (separate log-prob calls,
    NumPy selection and gathers): the oracle the one-program labeller must reproduce."""
    from sail_jax.evaluate import decode_responses, make_logp_fn
    from sail_jax.labeling import DP_KEY, LABEL_KEY, ROUTE_KEY, SELECT_KEY

    logp, ref_logp = make_logp_fn(loop.graphdef, loop.mesh), make_logp_fn(loop.ref_graphdef, loop.mesh)
    b, k, sail = len(batch["valid"]), int(loop.sail.num_samples), loop.sail
    p, pm = batch["prompt_ids"], batch["prompt_mask"]
    routes = np.asarray(draw_routes(loop._key(ROUTE_KEY, step), b, p_dp=sail.p_dp, p_pp=sail.p_pp, p_pr=sail.p_pr))
    out = {key: batch[key].copy() for key in ("prompt_ids", "prompt_mask", "chosen_response", "chosen_response_mask",
                                              "rejected_response", "rejected_response_mask")}
    ref = {s: ref_logp(loop.ref_params, p, pm, batch[f"{s}_response"], batch[f"{s}_response_mask"])
           for s in ("chosen", "rejected")}
    out["ref_chosen_logps"], out["ref_rejected_logps"] = ref["chosen"], ref["rejected"]
    valid = batch["valid"].astype(bool).copy()
    pol = {s: logp(loop.policy_params(), p, pm, batch[f"{s}_response"], batch[f"{s}_response_mask"])
           for s in ("chosen", "rejected")}
    h = (pol["chosen"] - ref["chosen"]) - (pol["rejected"] - ref["rejected"])
    swap = np.asarray(dp_swaps(loop._key(DP_KEY, step), jnp.asarray(h), loop.beta)) & (routes == ROUTE_DP)
    for suffix in ("response", "response_mask"):
        c, r = out[f"chosen_{suffix}"].copy(), out[f"rejected_{suffix}"].copy()
        out[f"chosen_{suffix}"][swap], out[f"rejected_{suffix}"][swap] = r[swap], c[swap]
    c, r = out["ref_chosen_logps"].copy(), out["ref_rejected_logps"].copy()
    out["ref_chosen_logps"], out["ref_rejected_logps"] = np.where(swap, r, c), np.where(swap, c, r)
    sampled = (routes == ROUTE_PP) | (routes == ROUTE_PR)
    tokens, smask, finished = samples["tokens"], samples["mask"], samples["finished"]
    rp, rpm = np.repeat(p, k, axis=0), np.repeat(pm, k, axis=0)
    ref_s = ref_logp(loop.ref_params, rp, rpm, tokens, smask).reshape(b, k)
    implicit = loop.beta * (logp(loop.policy_params(), rp, rpm, tokens, smask).reshape(b, k) - ref_s)
    texts = decode_responses(loop.tokenizer, tokens, smask)
    prompts = [loop.train_prompts[i] for i in batch["index"] for _ in range(k)]
    reward = (np.asarray(loop.reward_source(prompts, texts), np.float32)
              - float(loop.config.reward.missing_eos_penalty) * (~finished.astype(bool))).reshape(b, k)
    scores = np.where((routes == ROUTE_PP)[:, None], implicit, reward).astype(np.float32)
    a, bb = (np.asarray(x) for x in select_pairs(loop._key(SELECT_KEY, step), jnp.asarray(scores), sail.pair_selection))
    rows = np.arange(b)
    sa, sb = jnp.asarray(scores[rows, a]), jnp.asarray(scores[rows, bb])
    pp_wins, pp_tie = (np.asarray(x) for x in preference_labels(loop._key(LABEL_KEY, step), sa, sb, sail.pp_label_mode))
    pr_wins, pr_tie = (np.asarray(x) for x in preference_labels(jax.random.fold_in(loop._key(LABEL_KEY, step), 1), sa, sb,
                                                                 sail.pr_label_mode))
    a_wins = np.where(routes == ROUTE_PP, pp_wins, pr_wins)
    ia, ib = rows * k + a, rows * k + bb
    same = np.all((tokens[ia] == tokens[ib]) | (smask[ia] == 0), axis=1) & (smask[ia].sum(1) == smask[ib].sum(1))
    tie = np.where(routes == ROUTE_PP, pp_tie, pr_tie) | same
    win, lose = np.where(a_wins, ia, ib), np.where(a_wins, ib, ia)
    for name, idx in (("chosen", win), ("rejected", lose)):
        out[f"{name}_response"] = np.where(sampled[:, None], tokens[idx], out[f"{name}_response"])
        out[f"{name}_response_mask"] = np.where(sampled[:, None], smask[idx], out[f"{name}_response_mask"])
        out[f"ref_{name}_logps"] = np.where(sampled, ref_s.reshape(-1)[idx], out[f"ref_{name}_logps"])
    out["route"], out["valid"] = routes.astype(np.int32), (valid & ~(sampled & tie)).astype(np.int32)
    return out


@pytest.mark.parametrize("mesh_shape, variant", [((1, 1, 1), "sail_mixed"), ((2, 4, 1), "sail_mixed"),
                                                 ((1, 1, 1), "sail_pr")])
def test_one_program_labeller_equals_the_host_labelling_it_replaced(tiny_checkpoint, tmp_path, mesh_shape, variant):
    """Same keys, same samples: the jitted labeller gives the host implementation's train batch, bit for
    bit (routes, DP swaps, PP/PR selection and labels, ties, the gathered responses and reference
    log-probs), on one device and on an 8-device mesh; and without PP rows (sail_pr), where the
    labeller skips the policy's pass over the samples."""
    loop = online_loop(tiny_checkpoint, tmp_path, mesh_shape, variant=variant)
    loop.state = loop.state.replace(params=jax.tree.map(lambda x: x * 1.05, loop.state.params))  # π != π_ref
    block = loop._generate_block(0)
    for step in range(4):
        out, _ = _label(loop, step, block.batches[0], block.samples[0])
        expected = _host_labels(loop, step, block.batches[0], block.samples[0])
        assert out.keys() == expected.keys()
        for key in out:
            np.testing.assert_array_equal(out[key], expected[key], err_msg=key)


@pytest.mark.parametrize("variant, sail", [("online_dpo", {}), ("self_labelled_dpo", {"p_pp": 1.0}),
                                           ("nash_md", {})])
def test_when_every_row_is_sampled_prompts_alone_give_the_same_train_batch(tiny_checkpoint, tmp_path, variant, sail):
    """p_pp + p_pr = 1 (PR, PP, Nash-MD): the labeller skips the dataset pairs' reference pass, and a loop
    given prompts alone (data.train_kind=prompt) labels the same train batch, bit for bit, as the labeller
    that reads the pairs and replaces them row by row."""
    pairs = online_loop(tiny_checkpoint, tmp_path / "pairs", (1, 1, 1), variant=variant, sail=sail)
    prompts = online_loop(tiny_checkpoint, tmp_path / "prompts", (1, 1, 1), variant=variant, sail=sail,
                           train_kind="prompt")
    assert not pairs.dataset_pairs and not prompts.dataset_pairs
    reading = online_loop(tiny_checkpoint, tmp_path / "reading", (1, 1, 1), variant=variant, sail=sail)
    reading.dataset_pairs = True
    reading._labeller = reading._make_labeller()
    for loop in (pairs, prompts, reading):
        loop.state = loop.state.replace(params=jax.tree.map(lambda x: x * 1.05, loop.state.params))  # π != π_ref
    block, prompt_block = pairs._generate_block(0), prompts._generate_block(0)
    assert "chosen_response" in block.batches[0] and "chosen_response" not in prompt_block.batches[0]
    for key in ("prompt_ids", "index", "valid"):
        np.testing.assert_array_equal(prompt_block.batches[0][key], block.batches[0][key])
    for key in ("tokens", "mask"):
        np.testing.assert_array_equal(prompt_block.samples[0][key], block.samples[0][key])
    for step in range(3):
        expected, _ = _label(reading, step, block.batches[0], block.samples[0])
        for loop, batch in ((pairs, block.batches[0]), (prompts, prompt_block.batches[0])):
            out, _ = _label(loop, step, batch, block.samples[0])
            assert out.keys() == expected.keys()
            for key in out:
                np.testing.assert_array_equal(out[key], expected[key], err_msg=key)


def test_precomputed_reference_feeds_the_labeller_the_same_pairs(tiny_checkpoint, tmp_path):
    """reference.precompute: the dataset pairs' reference log-probs are computed once (cached in the
    workdir, read back by a second run), ride in the batches, and the labeller uses them instead of a
    reference pass: its train batch equals the live-reference labeller's (log-probs within 1e-5)."""
    live = online_loop(tiny_checkpoint, tmp_path / "live", (1, 1, 1))
    cached = online_loop(tiny_checkpoint, tmp_path / "cached", (1, 1, 1), precompute=True)
    cache = tmp_path / "cached" / "reference_logps_train.npz"
    assert cache.exists()
    for loop in (live, cached):
        loop.state = loop.state.replace(params=jax.tree.map(lambda x: x * 1.05, loop.state.params))
    block, cached_block = live._generate_block(0), cached._generate_block(0)
    assert "ref_chosen_logps" not in block.batches[0] and "ref_chosen_logps" in cached_block.batches[0]
    np.testing.assert_array_equal(cached_block.batches[0]["index"], block.batches[0]["index"])
    for step in range(3):
        out, _ = _label(live, step, block.batches[0], block.samples[0])
        got, _ = _label(cached, step, cached_block.batches[0], block.samples[0])
        assert got.keys() == out.keys()
        for key in out:
            if key.startswith("ref_"):
                np.testing.assert_allclose(got[key], out[key], atol=1e-5, err_msg=key)
            else:
                np.testing.assert_array_equal(got[key], out[key], err_msg=key)
    with np.load(cache) as f:
        written = f["chosen"].copy()
    np.savez(cache, chosen=written + 1.0, rejected=np.zeros_like(written))  # a second run reads the file
    again = online_loop(tiny_checkpoint, tmp_path / "cached", (1, 1, 1), precompute=True)
    batch = next(again.prompts)  # rows are records here (none skipped): index addresses the cache
    np.testing.assert_array_equal(batch["ref_chosen_logps"], written[batch["index"]] + 1.0)


def test_xpo_pairs_the_policys_sample_with_the_references(tiny_checkpoint, tmp_path):
    """sail.opponent=reference (XPO): each prompt's second sample is the reference model's (the same draw
    as sampling the reference alone), and ``opponent_chosen`` marks the rows whose chosen response it is."""
    from sail_jax.labeling import GEN_KEY
    from sail_jax.sampling import generate

    loop = online_loop(tiny_checkpoint, tmp_path, (1, 1, 1), variant="xpo")
    loop.state = loop.state.replace(params=jax.tree.map(lambda x: x * 1.05, loop.state.params))  # π != π_ref
    block = loop._generate_block(0)
    batch, samples = block.batches[0], block.samples[0]
    key = loop._key(GEN_KEY, 0)
    for model, k, rows in ((loop.trainable.model(loop.state.params), key, slice(0, None, 2)),
                           (nnx.merge(loop.ref_graphdef, loop.ref_params), jax.random.fold_in(key, 1), slice(1, None, 2))):
        alone = generate(model, batch["prompt_ids"], batch["prompt_mask"], k, max_new_tokens=10,
                         eos_ids=loop.tokenizer.eos_id, pad_id=loop.tokenizer.pad_id)
        np.testing.assert_array_equal(samples["tokens"][rows, :10], np.asarray(alone.tokens))
    assert not np.array_equal(samples["tokens"][0::2], samples["tokens"][1::2])
    out, _ = _label(loop, 0, batch, samples)
    ref_rows = samples["tokens"][1::2]
    sampled = out["route"] == ROUTE_PR
    is_ref = np.all(out["chosen_response"] == ref_rows, axis=1) & ~np.all(out["rejected_response"] == ref_rows, axis=1)
    np.testing.assert_array_equal(out["opponent_chosen"][sampled & (out["valid"] == 1)],
                                  is_ref[sampled & (out["valid"] == 1)])
    assert out["opponent_chosen"].any() and not out["opponent_chosen"].all()


def test_self_labelling_with_max_min_selection_starts_from_the_reference(tiny_checkpoint, tmp_path):
    """At π = π_ref every implicit reward is 0: max_min selection must still pair two different samples,
    so the PP rows carry (randomly labelled) pairs and training can start. Before the fix every PP pair
    was one sample twice, dropped as identical, and SAIL-PP on SmolLM2 never moved."""
    loop = online_loop(tiny_checkpoint, tmp_path, (1, 1, 1), variant="self_labelled_dpo",
                        sail={"pair_selection": "max_min", "p_pp": 1.0})
    block = loop._generate_block(0)
    out, _ = _label(loop, 0, block.batches[0], block.samples[0])
    pp = out["route"] == ROUTE_PP
    assert pp.all() and out["valid"][pp].mean() > 0.5, out["valid"]
    assert not np.array_equal(out["chosen_response"], out["rejected_response"])


def test_nash_md_pairs_the_policys_sample_with_the_mixtures(tiny_checkpoint, tmp_path):
    """sail.opponent=mixture (Nash-MD): each prompt's second sample is the geometric mixture's (the same
    draw as sampling the mixture alone); the policy's sample is always the chosen row, ties kept, with
    P = σ(r(y) − r(y')) from the reward source and the reference's per-token log-probs of y, which sum
    to its sequence log-prob."""
    from sail_jax.labeling import GEN_KEY
    from sail_jax.sampling import GeometricMixture, generate

    loop = online_loop(tiny_checkpoint, tmp_path, (1, 1, 1), variant="nash_md")
    loop.state = loop.state.replace(params=jax.tree.map(lambda x: x * 1.05, loop.state.params))  # π != π_ref
    block = loop._generate_block(0)
    batch, samples = block.batches[0], block.samples[0]
    key, policy = loop._key(GEN_KEY, 0), loop.trainable.model(loop.state.params)
    mixture = GeometricMixture(policy, nnx.merge(loop.ref_graphdef, loop.ref_params), 0.5)
    for model, k, rows in ((policy, key, slice(0, None, 2)), (mixture, jax.random.fold_in(key, 1), slice(1, None, 2))):
        alone = generate(model, batch["prompt_ids"], batch["prompt_mask"], k, max_new_tokens=10,
                         eos_ids=loop.tokenizer.eos_id, pad_id=loop.tokenizer.pad_id)
        np.testing.assert_array_equal(samples["tokens"][rows, :10], np.asarray(alone.tokens))
    out, metrics = _label(loop, 0, batch, samples)
    assert (out["route"] == ROUTE_PR).all() and (out["valid"] == batch["valid"]).all()  # nothing dropped
    np.testing.assert_array_equal(out["chosen_response"], samples["tokens"][0::2])
    np.testing.assert_array_equal(out["rejected_response"], samples["tokens"][1::2])
    texts = [loop.tokenizer.decode(t[m == 1].tolist()) for t, m in zip(samples["tokens"], samples["mask"])]
    reward = np.array([len(t.split()) for t in texts], np.float32) - 0.5 * ~samples["finished"].astype(bool)
    np.testing.assert_allclose(out["nash_probability"], 1 / (1 + np.exp(-(reward[0::2] - reward[1::2]))), rtol=1e-5)
    np.testing.assert_allclose(out["ref_chosen_token_logps"].sum(1), out["ref_chosen_logps"], atol=1e-4)
    assert (out["ref_chosen_token_logps"][out["chosen_response_mask"] == 0] == 0).all()


def test_spin_pairs_the_datasets_chosen_response_with_the_policys_sample(tiny_checkpoint, tmp_path):
    """sail.opponent=data (SPIN): one sample per prompt, the rejected response against the dataset's
    chosen one, with the sample's reference log-prob; identical pairs are dropped."""
    from sail_jax.evaluate import make_logp_fn

    loop = online_loop(tiny_checkpoint, tmp_path, (1, 1, 1), variant="spin")
    block = loop._generate_block(0)
    batch, samples = block.batches[0], block.samples[0]
    assert samples["tokens"].shape[0] == len(batch["valid"])
    out, metrics = _label(loop, 0, batch, samples)
    pr = out["route"] == ROUTE_PR
    assert pr.all()
    np.testing.assert_array_equal(out["chosen_response"], batch["chosen_response"])
    np.testing.assert_array_equal(out["rejected_response"], samples["tokens"])
    ref_logp = make_logp_fn(loop.ref_graphdef, loop.mesh)
    expected = ref_logp(loop.ref_params, batch["prompt_ids"], batch["prompt_mask"], samples["tokens"], samples["mask"])
    np.testing.assert_allclose(out["ref_rejected_logps"], expected, atol=1e-5)
    same = np.all((batch["chosen_response"] == samples["tokens"]) | (samples["mask"] == 0), axis=1) & (
        batch["chosen_response_mask"].sum(1) == samples["mask"].sum(1))
    np.testing.assert_array_equal(out["valid"], batch["valid"] * ~same)


def test_loop_labels_pr_by_the_reward_drops_ties_and_keeps_dataset_pairs_offline(loop):
    from sail_jax.evaluate import decode_responses, make_logp_fn

    block = loop._generate_block(0)
    batch, samples = block.batches[0], block.samples[0]
    out, metrics = _label(loop, 0, batch, samples)
    routes = out["route"]
    assert set(routes.tolist()) <= {ROUTE_OFFLINE, ROUTE_DP, ROUTE_PP, ROUTE_PR}
    for i in np.where(routes == ROUTE_PR)[0]:
        chosen = decode_responses(loop.tokenizer, out["chosen_response"][i:i + 1], out["chosen_response_mask"][i:i + 1])
        rejected = decode_responses(loop.tokenizer, out["rejected_response"][i:i + 1],
                                    out["rejected_response_mask"][i:i + 1])
        if out["valid"][i]:
            assert len(chosen[0].split()) > len(rejected[0].split())
        else:
            assert len(chosen[0].split()) == len(rejected[0].split())
    assert metrics["labels/ties_dropped"] == float(((routes >= ROUTE_PP) & (out["valid"] == 0)).sum())
    offline = np.where(routes == ROUTE_OFFLINE)[0]
    np.testing.assert_array_equal(out["chosen_response"][offline], batch["chosen_response"][offline])
    # Reference log-probs handed to the step are those of the responses actually used.
    ref = make_logp_fn(loop.ref_graphdef, loop.mesh)(loop.ref_params, out["prompt_ids"], out["prompt_mask"],
                                                     out["chosen_response"], out["chosen_response_mask"])
    np.testing.assert_allclose(out["ref_chosen_logps"], ref, atol=1e-4)


def test_loop_pp_labels_follow_the_implicit_reward_law(loop):
    """Over many steps, PP picks y_w = a with frequency σ(β·h_ab) (β·h from the current policy)."""
    from sail_jax.evaluate import make_logp_fn

    loop.state = loop.state.replace(params=jax.tree.map(lambda x: x * 1.05, loop.state.params))  # π != π_ref
    block = loop._generate_block(0)
    batch, samples = block.batches[0], block.samples[0]
    k, b = int(loop.sail.num_samples), 16
    rp, rpm = np.repeat(batch["prompt_ids"], k, 0), np.repeat(batch["prompt_mask"], k, 0)
    pol = make_logp_fn(loop.graphdef, loop.mesh)(loop.state.params, rp, rpm, samples["tokens"],
                                                 samples["mask"]).reshape(b, k)
    ref = make_logp_fn(loop.ref_graphdef, loop.mesh)(loop.ref_params, rp, rpm, samples["tokens"],
                                                     samples["mask"]).reshape(b, k)
    implicit = loop.beta * (pol - ref)
    p_first = 1 / (1 + np.exp(-(implicit[:, 0] - implicit[:, 1])))  # first_two selection
    hits, trials, expected = 0, 0, 0.0
    for step in range(300):
        out, _ = _label(loop, step, batch, samples)
        for i in np.where((out["route"] == ROUTE_PP) & (out["valid"] == 1))[0]:
            first = np.array_equal(out["chosen_response"][i], samples["tokens"][i * k])
            hits, trials, expected = hits + first, trials + 1, expected + p_first[i]
    assert trials > 500
    assert abs(hits - expected) <= 5 * np.sqrt(expected * (1 - expected / trials)) + 1, (hits, expected, trials)


def test_sail_objective_equals_sail_loss_on_the_same_pairs(loop):
    block = loop._generate_block(0)
    out, _ = _label(loop, 0, block.batches[0], block.samples[0])
    model = loop.export_model()
    objective = make_sail_objective(loop.config.loss, loop.sail, score_temperature=1.0)
    loss, metrics = objective(model, {k: jnp.asarray(v) for k, v in out.items()}, {"baseline": RunningBaseline.init()},
                              None)
    c = response_logps(model, out["prompt_ids"], out["prompt_mask"], out["chosen_response"], out["chosen_response_mask"])
    r = response_logps(model, out["prompt_ids"], out["prompt_mask"], out["rejected_response"],
                       out["rejected_response_mask"])
    s = loop.sail
    per_example, _ = sail_loss(c[0], r[0], out["ref_chosen_logps"], out["ref_rejected_logps"], out["route"], beta=0.1,
                               rho=s.rho, lam=s.lam, gamma=s.gamma, mask=out["valid"], chosen_lengths=c[1],
                               rejected_lengths=r[1])
    assert float(loss) == pytest.approx(float(per_example.sum() / out["valid"].sum()), abs=1e-5)


def test_every_variant_config_validates(tiny_checkpoint):
    from sail_jax.validation import ConfigError, validate_online_config

    def sail_config(name):  # on a model folder and a file (only the config values are checked), reward named
        from sail_jax.configs import sail_config as make

        c = make(name)
        c.model.path, c.data.train_path, c.reward.kind = tiny_checkpoint, os.path.join(REPO, "README.md"), "builtin"
        return c

    for name in VARIANTS:
        config = sail_config(name)
        validate_online_config(config)
    for reference, match in (({"precompute": True, "sync_every": 10}, "cannot be cached"),
                             ({"free": True}, "needs its reference"), ({"path": REPO}, "leave it empty")):
        bad = config.copy_and_resolve_references()
        bad.reference.update(reference)
        with pytest.raises(ConfigError, match=match):
            validate_online_config(bad)
    for name, sail, match in (("xpo", {"num_samples": 3}, "set sail.num_samples=2"),
                              ("xpo", {"gamma": 0.3}, "set gamma to 0"),
                              ("online_dpo", {"xpo_alpha": 0.1}, "needs sail.opponent='reference'"),
                              ("spin", {"num_samples": 2}, "each prompt takes one sample"),
                              ("spin", {"p_pp": 0.2, "p_pr": 0.8}, "nothing is self-labelled"),
                              ("online_dpo", {"opponent": "judge"},
                               "valid: \\['policy', 'reference', 'data', 'mixture'\\]"),
                              ("nash_md", {"num_samples": 4}, "set sail.num_samples=2"),
                              ("nash_md", {"mixture_coef": 1.5}, "must be in \\[0, 1\\]"),
                              ("nash_md", {"online_loss_type": "ipo"}, "has its own loss"),
                              ("nash_md", {"p_pp": 0.2, "p_pr": 0.8, "lam": 0.0}, "route its rows with p_pr"),
                              ("online_dpo", {"online_loss_type": "dpo"}, "online_loss_type='dpo' is unknown")):
        bad = sail_config(name)
        bad.sail.update(sail)
        with pytest.raises(ConfigError, match=match):
            validate_online_config(bad)
    config.sail.p_pp, config.sail.p_pr = 0.8, 0.5
    with pytest.raises(ConfigError, match="sum to <= 1"):
        validate_online_config(config)
    for name in ("online_dpo", "nash_md", "xpo", "online_ipo"):  # every row sampled: prompts alone will do
        prompts = sail_config(name)
        prompts.data.train_kind = "prompt"
        validate_online_config(prompts)
    for name, kind, match in (("sail_pp_revkl", "prompt", r"sail.p_dp=0.0, p_pp=0.3, p_pr=0.0.*set p_pp \+ p_pr = 1"),
                              ("spin", "prompt", "SPIN's opponent='data' needs pairs"),
                              ("online_dpo", "pairs", "train_kind='pairs' is unknown")):
        bad = sail_config(name)
        bad.data.train_kind = kind
        with pytest.raises(ConfigError, match=match):
            validate_online_config(bad)


@pytest.mark.slow
def test_main_job_is_healthy_at_its_own_defaults(tmp_path):
    """README's main job, exactly (no shortened variant): the policy improves on SFT and stays healthy —
    reward >= 0.5, KL(π‖π_ref) <= 5, per-response distinct-2 >= 0.95 (a looping policy fails it)."""
    from sail_jax.evaluate import health_problems

    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "sail_jax.cli", "--config=configs/sail_pp.py", f"--workdir={workdir}"],
        cwd=REPO, env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["variant"] == main_job_variant()
    assert health_problems(summary["final"]) == [], summary
    assert summary["final"]["reward"] > summary["reference"]["reward"] + 0.3, summary
    assert summary["final"]["win_rate"] > 0.65, summary
    assert f"{main_job_variant()} (final)" in result.stdout and (workdir / "curves.png").exists()
    assert (workdir / "export" / "model.safetensors").exists()
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    train = [r for r in logged if r["split"] == "train"][-1]
    for key in ("route/pp_frac", "route/offline_frac", "labels/pp_flip_rate", "sail/self_label_term",
                "sail/score_weight", "sail/abs_beta_h/pp", "sail/train_kl", "sail/revkl", "gen/distinct_2",
                "grad_norm/score", "grad_share/revkl", "gen/tokens_per_second", "gen/time_share", "buffer/staleness",
                "rewards/margins", "rewards/accuracies", "learning_rate"):
        assert key in train, key
    assert train["sail/revkl"] > 0 and train["grad_norm/revkl"] > 0


def test_a_run_on_your_data_without_a_held_out_set_or_a_reward_trains_and_says_what_it_left_out(
        tiny_checkpoint, tmp_path):
    """Evaluation is optional: SAIL-PP (no reward read) on a user's pairs with ``data.eval_path=''`` trains,
    logs its training metrics, evaluates nothing and says so in its summary."""
    import sail_jax
    from conftest import write_jsonl

    config = sail_config("sail_pp_revkl")
    config.model.path = tiny_checkpoint
    config.data.train_path = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(32, 1))
    config.data.max_prompt_length, config.data.max_response_length = 40, 12
    config.update(steps=3, batch_size=8, log_every=1, eval_every=1, compilation_cache="off")
    config.checkpoint.every = 0
    summary = sail_jax.run(config, str(tmp_path / "run"))
    assert summary["reference"] == {} and summary["final"] == {} and summary["steps"] == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert not [r for r in rows if r["split"] == "eval"] and not (tmp_path / "run" / "curves.png").exists()
    assert "no held-out set (data.eval_path is empty)" in (tmp_path / "run" / "summary.txt").read_text()
