"""Choosing bits and sparsity: per-layer sensitivity, allocation under a byte budget, plots (tools layer).

``sensitivity`` measures the loss increase of compressing each layer alone with
each candidate (one jitted sweep) and, as a cheap proxy, HAWQ-v2's Hessian-trace
prediction; ``allocate`` picks one candidate per layer that minimises the summed
increase within a byte budget (exact multiple-choice knapsack) and returns
``jaxqp.Rule``s. Bytes are counted as ``jaxqp.export`` stores them.

Example:
    >>> import jax, jax.numpy as jnp, jaxqp
    >>> params = {"a": {"kernel": jax.random.normal(jax.random.key(0), (32, 16))},
    ...           "b": {"kernel": jax.random.normal(jax.random.key(1), (16, 4))}}
    >>> def loss(p, x):
    ...     a, b = p["a"], p["b"]
    ...     return jnp.mean((jnp.tanh(x @ a["kernel"]) @ b["kernel"]) ** 2)
    >>> s = jaxqp.choose.sensitivity(loss, params, [jnp.ones((4, 32))],
    ...                              [jaxqp.QuantSpec(bits=8), jaxqp.QuantSpec(bits=4)], progress=False)
    >>> a = jaxqp.choose.allocate(s, budget_bytes=s.uniform("w4")[0] + 100)
    >>> t = jaxqp.transform(a.rules)
    >>> jaxqp.summary(params, t.init(params)).bytes_compressed == a.bytes
    True
"""

from ._allocate import Allocation, Front, allocate, pareto_front
from ._candidates import KEEP, Candidate
from ._plots import plot_pareto, plot_sensitivity
from ._proxy import hessian_traces, spearman
from ._sensitivity import Sensitivity, sensitivity

__all__ = [
    "KEEP",
    "Allocation",
    "Candidate",
    "Front",
    "Sensitivity",
    "allocate",
    "hessian_traces",
    "pareto_front",
    "plot_pareto",
    "plot_sensitivity",
    "sensitivity",
    "spearman",
]
