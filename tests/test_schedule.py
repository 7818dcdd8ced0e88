"""Sparsity schedules against their closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxqp import constant, one_shot, polynomial


def zhu_gupta(t, initial, final, begin, end, every, power=3.0):
    if t < begin:
        return 0.0
    t_last = min(begin + (t - begin) // every * every, end) if t < end else end
    return final + (initial - final) * (1 - (t_last - begin) / (end - begin)) ** power


@pytest.mark.parametrize("args", [(0.0, 0.8, 100, 1000, 50), (0.1, 0.9, 0, 130, 40), (0.0, 0.5, 3, 7, 1)])
def test_polynomial_matches_closed_form(args):
    s = polynomial(*args)
    steps = jnp.arange(0, args[3] + 60)
    got = np.asarray(jax.vmap(s)(steps))
    want = np.array([zhu_gupta(int(t), *args) for t in steps], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_polynomial_update_steps():
    s = polynomial(0.1, 0.9, begin=0, end=130, every=40)
    updates = [t for t in range(200) if bool(s.update_at(t))]
    assert updates == [0, 40, 80, 120, 130]
    assert float(s(130)) == pytest.approx(0.9) and float(s(129)) < 0.9


def test_polynomial_value_changes_only_at_update_steps():
    s = polynomial(0.0, 0.8, begin=10, end=95, every=20)
    values = np.asarray(jax.vmap(s)(jnp.arange(200)))
    changed = [t for t in range(1, 200) if values[t] != values[t - 1]]
    assert all(bool(s.update_at(t)) for t in changed)


def test_one_shot_and_constant():
    s = one_shot(0.7, step=5)
    assert [float(s(t)) for t in (0, 4, 5, 9)] == pytest.approx([0.0, 0.0, 0.7, 0.7])
    assert [bool(s.update_at(t)) for t in (4, 5, 6)] == [False, True, False]
    c = constant(0.3)
    assert float(c(0)) == pytest.approx(0.3) and float(c(999)) == pytest.approx(0.3)
    assert not bool(c.update_at(0))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: polynomial(0.0, 1.0, 0, 10), r"polynomial\(final\)=1.0"),
        (lambda: polynomial(-0.1, 0.5, 0, 10), r"polynomial\(initial\)=-0.1"),
        (lambda: polynomial(0.0, 0.5, 10, 5), r"end must come after begin"),
        (lambda: polynomial(0.0, 0.5, 0, 10, every=0), r"every"),
        (lambda: one_shot(0.5, step=-1), r"one_shot\(step\)"),
        (lambda: constant(1.0), r"\[0, 1\)"),
    ],
)
def test_bad_schedules_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_jit_and_eager_agree_within_a_few_ulps():
    # XLA on CPU may fuse a*b + c into one FMA under jit, so the last bits can differ;
    # the prune count round(s * n) is only affected within a few ulps of a .5 boundary.
    s = polynomial(0.05, 0.83, begin=7, end=301, every=3)
    jitted = jax.jit(s)
    for t in range(0, 320, 7):
        a, b = np.asarray(jitted(t)), np.asarray(s(t))
        assert abs(a - b) <= 4 * np.spacing(b), t
