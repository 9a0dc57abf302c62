"""GRPO, Dr. GRPO and RLOO as routes of the online loop: the labelling pass gives every sample its
advantage and the log-probs the loss reads (the sampler's equal the policy's own forward pass), bad
options are refused in one line, and the shipped configs end healthy on the built-in task."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import online_loop
from flax import nnx

from sail_jax.evaluate import decode_responses
from sail_jax.policy_gradient import group_advantages, group_token_logps, leave_one_out_advantages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _first_block(loop):
    loop.block = loop._generate_block(0)
    return loop.block.batches[0], loop.block.samples[0]


def _rows(batch, samples, k):
    return {"prompt_ids": np.repeat(batch["prompt_ids"], k, 0), "prompt_mask": np.repeat(batch["prompt_mask"], k, 0),
            "response": samples["tokens"], "response_mask": samples["mask"]}


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_labelling_gives_each_sample_its_advantage_and_exact_log_probs(tiny_checkpoint, tmp_path, method):
    """With two updates per generation (``generation.reuse=2``) the loss reads π_old: the sampler's own
    log-probs, which equal a forward pass of the sampling policy at the sampling temperature (0.7 here)
    within 1e-5, so no second forward is needed. Every sample is a row (its prompt repeated), with
    GRPO's group-normalised or RLOO's leave-one-out advantage of the word-count reward, RLOO's after
    β·Σ log(π_old/π_ref); the reference's per-token log-probs are a forward pass of the reference."""
    beta = {"grpo": 0.04, "rloo": 0.05}[method]
    loop = online_loop(tiny_checkpoint, tmp_path, (1, 1, 1), variant=method, train_kind="prompt",
                       generation={"reuse": 2, "temperature": 0.7})
    k = int(loop.sail.num_samples)
    batch, samples = _first_block(loop)
    rows = _rows(batch, samples, k)
    policy = loop.trainable.model(loop.state.params)
    mask = samples["mask"].astype(np.float32)
    own = np.asarray(group_token_logps(policy, rows, temperature=0.7))
    np.testing.assert_allclose(samples["logprobs"] * mask, own, atol=1e-5)
    reference = nnx.merge(loop.ref_graphdef, loop.ref_params)
    ref = np.asarray(group_token_logps(reference, rows, temperature=0.7))

    out, metrics = loop.label(0, batch, samples)
    out = jax.device_get(out)
    np.testing.assert_array_equal(out["prompt_ids"], rows["prompt_ids"])
    np.testing.assert_array_equal(out["response"], samples["tokens"])
    np.testing.assert_array_equal(out["valid"], np.repeat(batch["valid"], k))
    np.testing.assert_allclose(out["old_token_logps"], samples["logprobs"] * mask, atol=1e-6)
    texts = decode_responses(loop.tokenizer, samples["tokens"], samples["mask"])
    words = np.array([float(len(t.split())) for t in texts], np.float32)
    rewards = words - float(loop.config.reward.missing_eos_penalty) * (~samples["finished"].astype(bool))
    assert metrics["pg/reward"] == pytest.approx(float(rewards.mean()), abs=1e-5)
    if method == "grpo":
        np.testing.assert_allclose(out["ref_token_logps"], ref, atol=1e-5)
        expected, _ = group_advantages(jnp.asarray(rewards), k, "group")
    else:
        assert "ref_token_logps" not in out
        penalised = rewards - beta * ((samples["logprobs"] * mask - ref) * mask).sum(1)
        expected = leave_one_out_advantages(jnp.asarray(penalised), k)
    np.testing.assert_allclose(out["advantages"], np.asarray(expected), atol=1e-4)
    assert np.abs(out["advantages"]).sum() > 0


def test_one_update_per_generation_reads_no_old_log_probs_and_the_loop_trains(tiny_checkpoint, tmp_path):
    """Dr. GRPO at one update per generation: π_old = π, so neither the sampler's log-probs nor a
    reference pass (β = 0) enters the batch; two steps of the loop train on every sample and log the
    method's statistics."""
    loop = online_loop(tiny_checkpoint, tmp_path, (1, 1, 1), variant="dr_grpo", train_kind="prompt")
    batch, samples = _first_block(loop)
    assert "logprobs" not in samples
    out, _ = loop.label(0, batch, samples)
    assert {"old_token_logps", "ref_token_logps"}.isdisjoint(out)
    before = jax.device_get(loop.state.params)
    metrics = [loop.step(i) for i in range(2)]
    for m in metrics:
        assert np.isfinite(m["loss"]) and m["grad_norm"] > 0
        for key in ("pg/reward", "pg/zero_std_frac", "pg/advantage_abs", "pg/completion_length",
                    "pg/clip_ratio/low", "gen/distinct_2"):
            assert key in m, key
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), before,
                         jax.device_get(loop.state.params))
    assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.parametrize("variant, section, values, message", [
    ("grpo", "pg", {"method": "ppo"}, r"pg.method='ppo' is unknown; valid: '' \(SAIL's pairwise routes\) or"),
    ("grpo", "sail", {"p_pr": 0.5, "p_pp": 0.5}, "set sail.p_pr=1, p_pp=0, p_dp=0"),
    ("grpo", "sail", {"num_samples": 1}, r"num_samples=1 must be >= 2 \(a pair, or a group"),
    ("grpo", "sail", {"log_term_grads": True}, "replaces SAIL's pairwise loss"),
    ("grpo", "pg", {"loss_type": "sequence"}, "pg.loss_type='sequence' is unknown"),
    ("dr_grpo", "pg", {"scale_rewards": "std"}, "pg.scale_rewards='std' is unknown"),
    ("grpo", "pg", {"epsilon": 1.5}, r"epsilon=1.5 in \(0, 1\)"),
    ("grpo", "pg", {"delta": 0.5}, "pg.delta=0.5 must be > 1"),
    ("grpo", "pg", {"importance_sampling_level": "batch"}, "importance_sampling_level='batch' is unknown"),
    ("rloo", "generation", {"top_k": 20}, "reads the sampling policy's log-probs.*set top_k=0 and top_p=1"),
])
def test_bad_group_options_are_refused_in_one_line(tiny_checkpoint, variant, section, values, message):
    from sail_jax.configs import sail_config
    from sail_jax.validation import ConfigError, validate_online_config

    config = sail_config(variant)
    config.model.path, config.data.train_path, config.reward.kind = tiny_checkpoint, os.path.join(REPO, "README.md"), "builtin"
    validate_online_config(config)
    config[section].update(values)
    with pytest.raises(ConfigError, match=message):
        validate_online_config(config)


def test_filtered_sampling_is_allowed_where_no_old_log_prob_is_read(tiny_checkpoint):
    from sail_jax.configs import sail_config
    from sail_jax.validation import validate_online_config

    config = sail_config("grpo")  # one update per generation: the ratio is π/sg(π)
    config.model.path, config.data.train_path, config.reward.kind = tiny_checkpoint, os.path.join(REPO, "README.md"), "builtin"
    config.generation.update(top_k=20, top_p=0.9)
    validate_online_config(config)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_methods_are_healthy_on_the_built_in_task_on_two_seeds(tmp_path_factory, name):
    """configs/grpo.py and configs/rloo.py at their defaults on the built-in task, seeds 1 and 2 (their
    samples, prompt order and dropout; one task built by the first run and shared, as a study's seeds
    share it): reward >= 0.5, KL <= 5, distinct-2 >= 0.95 (the main job's bounds), and better than the
    SFT policy they start from."""
    from sail_jax.evaluate import health_problems

    task = tmp_path_factory.getbasetemp() / "group_methods_task"
    for seed in (1, 2):
        workdir = tmp_path_factory.mktemp(f"{name}_seed{seed}")
        out = subprocess.run([sys.executable, "-m", "sail_jax.cli", f"--config=configs/{name}.py",
                              f"--workdir={workdir}", f"--config.seed={seed}", f"--config.task.dir={task}"],
                             cwd=REPO, env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True,
                             timeout=1200)
        assert out.returncode == 0, out.stderr[-3000:]
        summary = json.loads((workdir / "summary.json").read_text())
        assert summary["variant"] == name
        assert health_problems(summary["final"]) == [], (seed, summary["final"])
        assert summary["final"]["reward"] > summary["reference"]["reward"] + 0.2, (seed, summary)
