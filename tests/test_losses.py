"""Preference losses against closed forms and TRL's metric definitions."""

import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from sail_jax.losses import LOSS_TYPES, preference_loss, preference_metrics

BETA = 0.1


def softplus(x):
    return math.log1p(math.exp(x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


EPS_EXO = 1e-3
AT_ZERO = {
    "sigmoid": math.log(2), "hinge": 1.0, "ipo": 1 / (4 * BETA**2), "robust": math.log(2),
    "exo_pair": math.log(0.5) - 0.5 * math.log1p(-EPS_EXO) - 0.5 * math.log(EPS_EXO),
    "nca_pair": 2 * math.log(2), "bco_pair": 2 * math.log(2), "sppo_hard": 1 / (2 * BETA**2),
    "aot": math.log(2), "aot_pair": math.log(2), "apo_zero": 1.0, "apo_down": 1.0,
    "discopop": 0.5 * math.log(2) + 0.5, "sigmoid_norm": math.log(2),
}

# A non-trivial point: chosen log-ratio +1, rejected log-ratio -2, h = 3, β·h = 0.3; lengths 5 and 8.
POINT = dict(chosen=-10.0, rejected=-14.0, ref_chosen=-11.0, ref_rejected=-12.0, len_c=5.0, len_r=8.0)
NORM_H = 1 / 5 - (-2 / 8)  # length-normalised margin, 0.45
AT_POINT = {
    "sigmoid": softplus(-0.3), "hinge": 0.7, "ipo": (NORM_H - 5) ** 2,
    "robust": softplus(-0.3),
    "exo_pair": sig(0.3) * (-softplus(-0.3) - math.log1p(-EPS_EXO)) + sig(-0.3) * (-softplus(0.3) - math.log(EPS_EXO)),
    "nca_pair": softplus(-0.1) + 0.5 * softplus(0.1) + 0.5 * softplus(-0.2),
    "bco_pair": softplus(-0.1) + softplus(-0.2), "sppo_hard": (1 - 5) ** 2 + (-2 + 5) ** 2,
    "aot": softplus(-0.3), "aot_pair": softplus(-0.3),
    "apo_zero": (1 - sig(0.1)) + sig(-0.2), "apo_down": sig(0.1) + 1 - sig(0.3),
    "discopop": softplus(-0.3) * (1 - sig(0.3 / 0.05)) + math.exp(-0.3) * sig(0.3 / 0.05),
    "sigmoid_norm": softplus(-BETA * NORM_H),
}


def _arr(x, n=3):
    return jnp.full((n,), x, jnp.float32)


def test_every_registered_loss_has_closed_form_checks():
    assert set(AT_ZERO) == set(LOSS_TYPES) == set(AT_POINT)


class TestClosedForms(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_closed_forms(self):
        for loss_type in sorted(LOSS_TYPES):
            fn = self.variant(lambda c, r, rc, rr, lc, lr, lt=loss_type: preference_loss(
                lt, c, r, rc, rr, beta=BETA, chosen_lengths=lc, rejected_lengths=lr))
            zero = fn(_arr(-7.0), _arr(-7.0), _arr(-7.0), _arr(-7.0), _arr(4.0), _arr(6.0))
            np.testing.assert_allclose(zero, AT_ZERO[loss_type], rtol=1e-5, err_msg=loss_type)
            p = POINT
            point = fn(_arr(p["chosen"]), _arr(p["rejected"]), _arr(p["ref_chosen"]), _arr(p["ref_rejected"]),
                       _arr(p["len_c"]), _arr(p["len_r"]))
            np.testing.assert_allclose(point, AT_POINT[loss_type], rtol=1e-5, err_msg=loss_type)

    @chex.variants(with_jit=True, without_jit=True)
    def test_label_smoothing_and_ipo_without_lengths(self):
        c, r, rc, rr = (_arr(POINT[k]) for k in ("chosen", "rejected", "ref_chosen", "ref_rejected"))
        cdpo = self.variant(lambda *a: preference_loss("sigmoid", *a, beta=BETA, label_smoothing=0.1))(c, r, rc, rr)
        np.testing.assert_allclose(cdpo, 0.9 * softplus(-0.3) + 0.1 * softplus(0.3), rtol=1e-5)
        robust = self.variant(lambda *a: preference_loss("robust", *a, beta=BETA, label_smoothing=0.1))(c, r, rc, rr)
        np.testing.assert_allclose(robust, (0.9 * softplus(-0.3) - 0.1 * softplus(0.3)) / 0.8, rtol=1e-5)
        ipo = self.variant(lambda *a: preference_loss("ipo", *a, beta=BETA))(c, r, rc, rr)
        np.testing.assert_allclose(ipo, (3 - 5) ** 2, rtol=1e-5)


def test_aot_sorts_margins_across_the_batch():
    # Policy margins [1, 5], reference margins [3, -1]: sorted, both deltas are 2.
    loss = preference_loss("aot", jnp.array([1.0, 5.0]), jnp.zeros(2), jnp.array([3.0, -1.0]), jnp.zeros(2), beta=1.0)
    np.testing.assert_allclose(loss, [softplus(-2.0)] * 2, rtol=1e-6)


def test_unknown_loss_type_and_extras_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown loss_type 'dpo'; valid: \['aot', 'aot_pair'"):
        preference_loss("dpo", _arr(0), _arr(0), _arr(0), _arr(0), beta=BETA)
    with pytest.raises(TypeError, match=r"valid extras: \['bco_delta', 'discopop_tau'\]"):
        preference_loss("sigmoid", _arr(0), _arr(0), _arr(0), _arr(0), beta=BETA, tau=1.0)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        preference_loss("sigmoid_norm", _arr(0), _arr(0), _arr(0), _arr(0), beta=BETA)


def test_reference_free_mode_equals_zero_reference():
    c, r = jnp.array([-3.0, -5.0]), jnp.array([-4.0, -2.0])
    for loss_type in ("sigmoid", "ipo", "nca_pair"):
        np.testing.assert_allclose(preference_loss(loss_type, c, r, None, None, beta=BETA),
                                   preference_loss(loss_type, c, r, jnp.zeros(2), jnp.zeros(2), beta=BETA))


def test_preference_metrics_match_trl_definitions():
    m = preference_metrics(jnp.array([-1.0, -3.0]), jnp.array([-2.0, -2.0]), jnp.zeros(2), jnp.zeros(2), beta=0.5)
    np.testing.assert_allclose(m["rewards/chosen"], -1.0)
    np.testing.assert_allclose(m["rewards/rejected"], -1.0)
    np.testing.assert_allclose(m["rewards/margins"], 0.0)
    np.testing.assert_allclose(m["rewards/accuracies"], 0.5)  # strict >: the tie does not count
    np.testing.assert_allclose(m["logps/chosen"], -2.0)
