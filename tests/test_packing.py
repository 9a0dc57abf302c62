"""Padding-free packing: packed rows hold every sequence once, and give the unpacked batch's losses and
gradients (SFT and DPO), on one device and on a mesh."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_buckets import _long_tailed_pairs

from sail_jax.configs import base_config
from sail_jax.data.buckets import Buckets, ShapeLog
from sail_jax.data.packing import pack
from sail_jax.data.pipeline import encode_preference, encode_sft, train_iterator
from sail_jax.data.records import Records
from sail_jax.models import load_pretrained
from sail_jax.objectives import make_dpo_objective, sft_objective
from sail_jax.tokenization import Tokenizer

POW2 = Buckets.parse("pow2", 8)


def _preference(tiny_checkpoint, n=8, seed=0):
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    return encode_preference(Records(_long_tailed_pairs(n, seed)), tokenizer, max_prompt_length=64,
                             max_length=160).arrays


def test_packed_rows_hold_every_sequence_once_in_fewer_tokens(tiny_checkpoint):
    arrays = {k: v for k, v in _preference(tiny_checkpoint, 16).items() if not k.startswith("prompt")}
    packed = pack(arrays, POW2, row_multiple=4)
    rows, width = packed["packed_input_ids"].shape
    assert rows % 4 == 0 and "chosen_input_ids" not in packed and packed["valid"].shape == (16,)
    assert rows * width < 32 * arrays["chosen_input_ids"].shape[1]  # fewer tokens than the padded batch
    for i, side in enumerate(("chosen",) * 16 + ("rejected",) * 16):
        row = i % 16
        n = arrays[f"{side}_attention_mask"][row].sum()
        where = packed["packed_sequence"] == i
        assert where.sum() == n and len(np.unique(packed["packed_segment_ids"][where])) == 1
        np.testing.assert_array_equal(packed["packed_input_ids"][where], arrays[f"{side}_input_ids"][row, :n])
        np.testing.assert_array_equal(packed["packed_loss_mask"][where], arrays[f"{side}_loss_mask"][row, :n])
    assert (packed["packed_segment_ids"] == 0).sum() == (packed["packed_sequence"] == 32).sum()
    real = sum(arrays[f"{s}_attention_mask"].sum() for s in ("chosen", "rejected"))
    assert ShapeLog().metrics(packed)["batch/pad_fraction"] == pytest.approx(1 - real / (rows * width))
    with pytest.raises(ValueError, match="right-padded"):
        pack({**arrays, "chosen_attention_mask": arrays["chosen_attention_mask"][:, ::-1]}, POW2)


def _loss_and_grads(objective, model, batch, frozen):
    graphdef, params = nnx.split(model)
    loss = lambda p: objective(nnx.merge(graphdef, p), jax.tree.map(jnp.asarray, batch), frozen,  # noqa: E731
                               jax.random.key(0))
    return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("recipe", ["dpo", "sft"])
def test_packed_batch_gives_the_unpacked_batchs_loss_and_gradients(tiny_checkpoint, recipe):
    model = load_pretrained(tiny_checkpoint)
    if recipe == "dpo":
        batch = {k: v for k, v in _preference(tiny_checkpoint, seed=3).items() if not k.startswith("prompt")}
        objective = make_dpo_objective(base_config("dpo").loss, nnx.graphdef(model), "model")
        frozen = {"reference": jax.tree.map(lambda x: x * 1.01, nnx.state(model))}
    else:
        rows = [{"prompt": r["prompt"], "response": r["chosen"]} for r in _long_tailed_pairs(8, seed=4)]
        batch = encode_sft(Records(rows), Tokenizer.from_pretrained(tiny_checkpoint), max_prompt_length=64,
                           max_length=160).arrays
        objective, frozen = sft_objective, None
    packed = pack(batch, POW2)
    assert packed["packed_input_ids"].shape[0] < 8  # several sequences share a row
    (loss_u, metrics_u), grads_u = _loss_and_grads(objective, model, batch, frozen)
    (loss_p, metrics_p), grads_p = _loss_and_grads(objective, model, packed, frozen)
    assert abs(float(loss_p) - float(loss_u)) <= 1e-5 * max(1.0, abs(float(loss_u)))
    chex.assert_trees_all_close(metrics_p, metrics_u, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(grads_p, grads_u, atol=1e-5, rtol=1e-4)


def _packed_dpo_step(tiny_checkpoint, batch, mesh_shape):
    """Loss, gradient norm and updated parameters of one SGD DPO step on a packed batch."""
    from sail_jax.optim import make_optimizer
    from sail_jax.sharding import make_mesh, shard_batch, sharding_fn
    from sail_jax.train import create_train_state, frozen_copy, make_train_step

    config = base_config("dpo")
    config.optim.name, config.optim.learning_rate, config.optim.schedule = "sgd", 0.1, "constant"
    mesh = make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    model = load_pretrained(tiny_checkpoint, shardings=sharding_fn(mesh))
    tx = make_optimizer(config.optim, 10)
    graphdef, state, shardings = create_train_state(model, tx, mesh)
    frozen = {"reference": jax.tree.map(lambda x: x * 1.01, frozen_copy(state.params, shardings.params))}
    step = make_train_step(graphdef, tx, make_dpo_objective(config.loss, graphdef, "model"), mesh, shardings,
                           {"reference": shardings.params}, seed=0)
    state, metrics = step(state, shard_batch(batch, mesh), frozen)
    return float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state.params)


def test_a_packed_dpo_step_on_a_mesh_equals_one_device(tiny_checkpoint):
    arrays = {k: v for k, v in _preference(tiny_checkpoint, 8, seed=6).items() if not k.startswith("prompt")}
    packed = pack(arrays, POW2, row_multiple=8)  # the rows split over the 8 data-parallel devices
    loss1, gnorm1, params1 = _packed_dpo_step(tiny_checkpoint, packed, (1, 1, 1))
    loss8, gnorm8, params8 = _packed_dpo_step(tiny_checkpoint, packed, (2, 4, 1))
    assert abs(loss8 - loss1) < 1e-5 and abs(gnorm8 - gnorm1) < 1e-5 * max(1.0, gnorm1) and gnorm1 > 1e-3
    chex.assert_trees_all_close(params8, params1, atol=1e-6)


def test_packed_batches_split_over_processes_as_one_process_packs_them(tiny_checkpoint):
    arrays = {k: v for k, v in _preference(tiny_checkpoint, 32, seed=5).items() if not k.startswith("prompt")}
    single = train_iterator(arrays, 8, seed=2, buckets=POW2, packing=True, row_multiple=2)
    halves = [train_iterator(arrays, 4, seed=2, buckets=POW2, packing=True, row_multiple=2, process_index=p,
                             process_count=2) for p in (0, 1)]
    for _ in range(4):
        whole, parts = next(single), [next(h) for h in halves]
        assert set(whole) == {"packed_input_ids", "packed_segment_ids", "packed_loss_mask", "packed_sequence",
                              "valid"}
        for k in whole:
            np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))


def test_packing_is_refused_where_a_recipe_takes_whole_rows(tiny_checkpoint):
    from sail_jax.configs import sail_config
    from sail_jax.validation import ConfigError, validate_online_config, validate_training_config

    config = base_config("reward")
    config.model.path, config.data.train_path, config.data.packing = tiny_checkpoint, __file__, True
    with pytest.raises(ConfigError, match="data.packing=True packs SFT and DPO batches"):
        validate_training_config(config)
    online = sail_config("online_dpo")
    online.data.packing = True
    with pytest.raises(ConfigError, match="data.packing=True"):
        validate_online_config(online)
