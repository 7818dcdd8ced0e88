"""Learned quantizers: LSQ, LSQ+ and PACT gradients against the papers' formulas; routing through wrap."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxqp
from jaxqp import QuantSpec
from jaxqp.numerics import lsq, lsq_grad_scale, pact

X = jnp.array([-9.0, -2.26, -0.4, 0.0, 0.3, 1.5, 2.74, 3.6, 12.0])


def test_lsq_gradients_match_esser_formula():
    step, qmin, qmax, g = 0.5, -7, 7, 0.3
    ybar = jnp.linspace(0.5, 1.5, X.size)  # a non-uniform upstream gradient
    gx, gs = jax.grad(lambda x, s: jnp.sum(lsq(x, s, qmin, qmax, g) * ybar), argnums=(0, 1))(X, jnp.float32(step))
    v = np.asarray(X) / step
    inside = (v >= qmin) & (v <= qmax)
    q = np.clip(np.round(v), qmin, qmax)
    np.testing.assert_array_equal(np.asarray(gx), np.where(inside, ybar, 0))
    want = g * np.sum(np.where(inside, q - v, q) * np.asarray(ybar))
    assert float(gs) == pytest.approx(want, rel=1e-5)
    # forward is ordinary fake-quant
    np.testing.assert_array_equal(np.asarray(lsq(X, jnp.float32(step), qmin, qmax, g)), q * step)


def test_lsq_plus_offset_gradient():
    step, offset, qmin, qmax, g = 0.25, 1.0, -8, 7, 0.5
    f = lambda x, s, b: jnp.sum(lsq(x, s, qmin, qmax, g, b))
    gx, gs, gb = jax.grad(f, argnums=(0, 1, 2))(X, jnp.float32(step), jnp.float32(offset))
    v = (np.asarray(X) - offset) / step
    inside = (v >= qmin) & (v <= qmax)
    q = np.clip(np.round(v), qmin, qmax)
    np.testing.assert_array_equal(np.asarray(gx), inside.astype(np.float32))
    assert float(gs) == pytest.approx(g * np.sum(np.where(inside, q - v, q)), rel=1e-5)
    assert float(gb) == pytest.approx(g * np.sum(~inside), rel=1e-6)
    np.testing.assert_allclose(np.asarray(lsq(X, jnp.float32(step), qmin, qmax, g, jnp.float32(offset))),
                               q * step + offset, rtol=1e-6)


def test_lsq_step_gradient_of_clipped_entries_by_finite_differences():
    # Clipped entries give y = qmax * s (or qmin * s): smooth in s, so a central difference
    # must agree with the LSQ gradient there (inside, the rounding makes y a step function).
    x = jnp.array([12.0, -9.0])
    f = lambda s: jnp.sum(lsq(x, s, -7, 7, 1.0))
    s, h = 0.5, 1e-3
    numeric = (float(f(jnp.float32(s + h))) - float(f(jnp.float32(s - h)))) / (2 * h)
    assert float(jax.grad(f)(jnp.float32(s))) == pytest.approx(numeric, rel=1e-3)


def test_grad_scale_value():
    assert lsq_grad_scale(1024, 7) == pytest.approx(1 / math.sqrt(1024 * 7))


@pytest.mark.parametrize("signed", [False, True])
def test_pact_gradients_match_choi_formula(signed):
    alpha = 3.0
    ga = jax.grad(lambda a: jnp.sum(pact(X, a, 4, signed)))(jnp.float32(alpha))
    gx = jax.grad(lambda x: jnp.sum(pact(x, jnp.float32(alpha), 4, signed)))(X)
    x = np.asarray(X)
    if signed:
        inside = (x >= -alpha) & (x < alpha)
        want_a = np.sum(np.where(inside, 0.0, np.sign(x)))
    else:
        inside = (x >= 0) & (x < alpha)
        want_a = np.sum(x >= alpha)
    assert float(ga) == want_a
    np.testing.assert_array_equal(np.asarray(gx), inside.astype(np.float32))
    y = np.asarray(pact(X, jnp.float32(alpha), 4, signed))
    assert y.max() == alpha and (y.min() == (-alpha if signed else 0.0))


def _lsq_setup():
    params = {"w": jax.random.normal(jax.random.key(0), (64, 4))}
    t = jaxqp.transform([jaxqp.Rule("w", quant=QuantSpec(bits=4, learned="lsq"))])
    return params, t, t.init(params)


def test_lsq_weight_init_and_gradient_reach_the_state():
    params, t, state = _lsq_setup()
    step = state.learned["weights"]["w"]["step"]
    want = 2 * np.mean(np.abs(np.asarray(params["w"])), axis=0, keepdims=True) / math.sqrt(7)
    np.testing.assert_allclose(np.asarray(step), want, rtol=1e-6)
    gp, gs = jax.grad(lambda p, s: jnp.sum(t.apply(p, s)["w"]), argnums=(0, 1), allow_int=True)(params, state)
    v = np.asarray(params["w"]) / np.asarray(step)
    q = np.clip(np.round(v), -7, 7)
    inside = (v >= -7) & (v <= 7)
    g = 1 / math.sqrt(64 * 7)  # N = 64 weights per step (one step per output channel)
    want_gs = g * np.sum(np.where(inside, q - v, q), axis=0, keepdims=True)
    np.testing.assert_allclose(np.asarray(gs.learned["weights"]["w"]["step"]), want_gs, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(gp["w"]), inside.astype(np.float32))


def test_wrap_updates_learned_steps_and_export_uses_them():
    params, t, _ = _lsq_setup()
    tx = jaxqp.wrap(optax.sgd(0.1), t)
    opt_state = tx.init(params)
    loss = lambda p, s: jnp.sum(t.apply(p, s)["w"] ** 2)
    state = jaxqp.state_of(opt_state)
    grads = jax.grad(loss, argnums=(0, 1), allow_int=True)(params, state)
    with pytest.raises(ValueError, match="argnums=\\(0, 1\\)"):
        tx.update(grads[0], opt_state, params)
    updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
    new = jaxqp.state_of(opt_state).learned["weights"]["w"]["step"]
    want = state.learned["weights"]["w"]["step"] - 0.1 * grads[1].learned["weights"]["w"]["step"]
    np.testing.assert_array_equal(np.asarray(new), np.asarray(want))
    params = optax.apply_updates(params, updates)
    packed = jaxqp.export(params, jaxqp.state_of(opt_state))
    np.testing.assert_array_equal(np.asarray(packed["w"].scale), np.asarray(new))
    np.testing.assert_array_equal(np.asarray(jaxqp.dequantize(packed)["w"]),
                                  np.asarray(t.apply(params, jaxqp.state_of(opt_state))["w"]))


@pytest.mark.standard_promotion  # optax.adam
def test_learned_values_with_gradient_accumulation_inside_wrap():
    params, t, _ = _lsq_setup()
    tx = jaxqp.wrap(optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2), t)
    opt_state = tx.init(params)
    loss = lambda p, s: jnp.sum(t.apply(p, s)["w"] ** 2)

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(loss, argnums=(0, 1), allow_int=True)(params, jaxqp.state_of(opt_state))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    first = jaxqp.state_of(opt_state).learned["weights"]["w"]["step"]
    new_params, opt_state = step(params, opt_state)
    np.testing.assert_array_equal(np.asarray(new_params["w"]), np.asarray(params["w"]))  # accumulating
    params, opt_state = step(new_params, opt_state)
    assert not np.array_equal(np.asarray(params["w"]), np.asarray(new_params["w"]))  # applied at k = 2
    assert not np.array_equal(np.asarray(jaxqp.state_of(opt_state).learned["weights"]["w"]["step"]),
                              np.asarray(first))
