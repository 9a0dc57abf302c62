"""Training core: sharded steps equal single-device ones, optimizers by name, schedules, gradient
accumulation, offline recipes that learn, and config errors."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import synthetic_pairs, write_jsonl
from flax import nnx

from sail_jax.configs import base_config
from sail_jax.data.pipeline import encode_preference
from sail_jax.data.records import Records
from sail_jax.models import ModelConfig, build_model, load_pretrained
from sail_jax.objectives import make_dpo_objective
from sail_jax.optim import OPTIMIZERS, decay_mask, make_optimizer, make_schedule
from sail_jax.sharding import bytes_per_device, make_mesh, shard_batch
from sail_jax.tokenization import Tokenizer
from sail_jax.train import create_train_state, frozen_copy, make_train_step
from sail_jax.validation import ConfigError, validate_training_config


def _dpo_setup(tiny_checkpoint, n=8):
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    enc = encode_preference(Records(synthetic_pairs(n)), tokenizer, max_prompt_length=40, max_length=48)
    config = base_config("dpo")
    return config, enc.arrays


def _one_dpo_step(tiny_checkpoint, mesh_shape, optim="sgd"):
    """Loss, gradient-free update and new params of one DPO step on a mesh of 8 fake devices."""
    config, batch = _dpo_setup(tiny_checkpoint)
    config.optim.name, config.optim.learning_rate, config.optim.schedule = optim, 0.1, "constant"
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = make_mesh(mesh_shape, devices)
    from sail_jax.sharding import sharding_fn

    model = load_pretrained(tiny_checkpoint, shardings=sharding_fn(mesh))
    tx = make_optimizer(config.optim, 10)
    graphdef, state, shardings = create_train_state(model, tx, mesh)
    frozen = {"reference": frozen_copy(state.params, shardings.params)}
    # A reference that differs from the policy, so h != 0 and the gradient is not trivial.
    frozen["reference"] = jax.tree.map(lambda x: x * 1.01, frozen["reference"])
    step = make_train_step(graphdef, tx, make_dpo_objective(config.loss, graphdef, "model"), mesh, shardings,
                           {"reference": shardings.params}, seed=0)
    state, metrics = step(state, shard_batch(batch, mesh), frozen)
    return float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state.params), state


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2)])
def test_sharded_dpo_step_equals_single_device(tiny_checkpoint, mesh_shape):
    loss1, gnorm1, params1, _ = _one_dpo_step(tiny_checkpoint, (1, 1, 1))
    loss8, gnorm8, params8, _ = _one_dpo_step(tiny_checkpoint, mesh_shape)
    assert abs(loss8 - loss1) < 1e-5 and abs(gnorm8 - gnorm1) < 1e-5 * max(1.0, gnorm1)
    assert gnorm1 > 1e-3
    # SGD: params1 - params0 = -lr * grad, so equal params mean equal gradients.
    chex.assert_trees_all_close(params8, params1, atol=1e-5, rtol=0)


def test_fsdp_layout_holds_an_eighth_of_params_and_optimizer_state(tiny_checkpoint):
    _, _, _, state = _one_dpo_step(tiny_checkpoint, (1, 8, 1), optim="adamw")
    total = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
    per_device = bytes_per_device((state.params, state.opt_state))
    assert len(per_device) == 8
    assert max(per_device.values()) <= 1.1 * total / 8, (max(per_device.values()), total)


def _tiny_params():
    model = build_model(ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8))
    return nnx.split(model)


def _quadratic_loss(graphdef, params, x):
    logits = nnx.merge(graphdef, params)(x, jnp.ones_like(x))
    return jnp.mean(logits**2)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_registered_optimizer_runs_a_step_and_logs_its_learning_rate(name):
    config = base_config("dpo").optim
    config.name, config.learning_rate, config.schedule, config.weight_decay = name, 1e-3, "constant", 0.01
    graphdef, params = _tiny_params()
    tx = make_optimizer(config, 10)
    state = tx.init(params)
    x = jnp.arange(8)[None] % 32
    grads = jax.grad(lambda p: _quadratic_loss(graphdef, p, x))(params)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert float(_quadratic_loss(graphdef, new, x)) < float(_quadratic_loss(graphdef, params, x))
    from sail_jax.optim import learning_rate

    assert float(learning_rate(state)) == pytest.approx(1e-3)


def test_unknown_optimizer_and_bad_kwargs_are_clear_errors():
    config = base_config("dpo").optim
    config.name = "adamax"
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamax'; valid: \['adafactor', 'adam', 'adamw'"):
        make_optimizer(config, 10)
    config.name = "adamw"
    config.kwargs.momentum = 0.9
    with pytest.raises(ValueError, match=r"\['momentum'\] not accepted by optax.adamw"):
        make_optimizer(config, 10)


def test_schedules_warm_up_then_follow_their_shape():
    config = base_config("dpo").optim
    config.learning_rate, config.warmup_steps, config.end_lr_ratio = 1.0, 10, 0.1
    expected = {  # step -> lr (110 updates: 10 warmup + 100)
        "constant": {0: 0.0, 5: 0.5, 10: 1.0, 109: 1.0},
        "linear": {5: 0.5, 10: 1.0, 60: 0.55, 110: 0.1},
        "cosine": {10: 1.0, 60: 0.55, 110: 0.1},
        "wsd": {10: 1.0, 89: 1.0, 90: 1.0, 100: 0.55, 110: 0.1},
    }
    for name, points in expected.items():
        config.schedule = name
        schedule = make_schedule(config, 110)
        for step, lr in points.items():
            assert float(schedule(step)) == pytest.approx(lr, abs=1e-6), (name, step)


def test_weight_decay_skips_vectors():
    _, params = _tiny_params()
    mask = decay_mask(params)
    flat = {"/".join(str(k) for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert any(v for k, v in flat.items() if "embedding" in k)
    assert not any(v for k, v in flat.items() if "scale" in k)


def test_gradient_accumulation_equals_one_big_batch():
    config = base_config("dpo").optim
    config.name, config.learning_rate, config.schedule, config.clip_norm = "adam", 1e-2, "constant", 0.0
    graphdef, params = _tiny_params()
    x = (jnp.arange(32).reshape(4, 8) * 7) % 32
    grad = jax.grad(lambda p, b: _quadratic_loss(graphdef, p, b))
    big = make_optimizer(config, 10)
    updates, _ = big.update(grad(params, x), big.init(params), params)
    expected = optax.apply_updates(params, updates)
    config.grad_accum_steps = 2
    acc = make_optimizer(config, 20)
    state = acc.init(params)
    p = params
    for half in (x[:2], x[2:]):
        updates, state = acc.update(grad(params, half), state, p)
        p = optax.apply_updates(p, updates)
    chex.assert_trees_all_close(p, expected, atol=1e-6)


# ------------------------------------------------------------------------------- recipes, end to end
def _config(recipe, tiny_checkpoint, tmp_path, steps=60):
    config = base_config(recipe)
    config.model.path = tiny_checkpoint
    config.data.train_path = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(128, 1))
    config.data.eval_path = write_jsonl(tmp_path / "eval.jsonl", synthetic_pairs(32, 2))
    config.data.max_prompt_length, config.data.max_length = 40, 48
    config.batch_size, config.eval_batch_size, config.steps = 16, 16, steps
    config.optim.learning_rate, config.eval_every, config.checkpoint.every = 3e-3, steps, 0
    return config


def test_offline_dpo_learns_the_preference_on_held_out_pairs(tiny_checkpoint, tmp_path):
    from sail_jax.recipes import get_recipe

    config = _config("dpo", tiny_checkpoint, tmp_path)
    config.reference.precompute = True
    final = get_recipe("dpo")(config, str(tmp_path / "run"))
    assert final["rewards/accuracies"] >= 0.9, final
    assert (tmp_path / "run" / "reference_logps_train.npz").exists()


def test_reward_model_learns_and_exports_a_sequence_classifier(tiny_checkpoint, tmp_path):
    from sail_jax.recipes import get_recipe

    final = get_recipe("reward")(_config("reward", tiny_checkpoint, tmp_path), str(tmp_path / "run"))
    assert final["rewards/accuracies"] >= 0.9, final
    exported = load_pretrained(str(tmp_path / "run" / "export"))
    assert type(exported).__name__ == "RewardModel"
    # The export is a reward source for SAIL-PR: it prefers held-out chosen responses on text.
    from sail_jax.rewards import ModelReward

    rows = synthetic_pairs(16, 3)
    source = ModelReward(str(tmp_path / "run" / "export"), max_length=32, batch_size=8)
    chosen = source([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = source([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert chosen.shape == (16,) and np.mean(chosen > rejected) >= 0.9


def test_sft_lowers_the_response_nll(tiny_checkpoint, tmp_path):
    from sail_jax.recipes import get_recipe

    config = _config("sft", tiny_checkpoint, tmp_path, steps=30)
    config.eval_every = 1
    config.export = config.checkpoint.final = False  # a sweep's setting: the run leaves its metrics, no weights
    get_recipe("sft")(config, str(tmp_path / "run"))
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open() if '"eval"' in line]
    assert evals[-1]["nll"] < 0.7 * evals[0]["nll"], (evals[0]["nll"], evals[-1]["nll"])
    assert not (tmp_path / "run" / "export").exists() and not list((tmp_path / "run").glob("checkpoints/*"))


@pytest.mark.parametrize("key,value,message", [
    ("optim.name", "adamax", r"config.optim.name='adamax' is unknown; valid: \['adafactor'"),
    ("loss.loss_type", "kto", r"config.loss.loss_type='kto' is unknown; valid:"),
    ("mesh.data", 3, r"config.mesh: .*do not divide the 8 devices"),
    ("batch_size", 12, r"config.batch_size=12 is not divisible by the data-parallel size 8"),
    ("data.source", "csv", r"config.data.source='csv' is unknown; valid: \['jsonl', 'tfds', 'hf'\]"),
])
def test_bad_configs_fail_early_with_the_key_and_the_fix(tiny_checkpoint, tmp_path, key, value, message):
    config = _config("dpo", tiny_checkpoint, tmp_path)
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
    with pytest.raises(ConfigError, match=message):
        validate_training_config(config)


def test_metric_log_keeps_one_history_across_restarts(tmp_path):
    from sail_jax.train import MetricLogger

    def steps():
        return [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]

    log = MetricLogger(str(tmp_path), enabled=True)
    for step in (1, 2, 3, 4):
        log.write(step, {"loss": 1.0 / step})
    log.close()
    log = MetricLogger(str(tmp_path), start_step=2, enabled=True)  # resumed from the step-2 checkpoint
    log.write(3, {"loss": 0.5})
    log.close()
    assert steps() == [1, 2, 3]
    MetricLogger(str(tmp_path), enabled=True).close()  # no checkpoint: a fresh start
    assert steps() == []
