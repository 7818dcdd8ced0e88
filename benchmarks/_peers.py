"""QAT versions of the benchmark CNN built with the peer libraries, when they are installed.

Each builder returns ``{config: flax module}``: modules with the same parameter
tree as ``CNN1D``, which train through the same ``Run`` loop with no jaxqp
rules. A peer that is not installed gives no rows; one that fails to compile or
train is reported by the benchmark as failed.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from _mnist1d import CNN1D


def qwix_models(model) -> dict:
    """Qwix QAT (``qwix.quantize_model`` with its own rules) of ``model``."""
    try:
        import qwix
    except ImportError:
        return {}

    def qwix_model(weight, act=None, tile=None):
        rule = qwix.QtRule(module_path=".*", weight_qtype=weight, act_qtype=act, tile_size=tile)
        return qwix.quantize_model(model, qwix.QtProvider([rule]))

    return {
        "qwix-w8a8": qwix_model(jnp.int8, jnp.int8),
        "qwix-w4a8": qwix_model(jnp.int4, jnp.int8),
        "qwix-w4a4": qwix_model(jnp.int4, jnp.int4),
        "qwix-w4g32": qwix_model(jnp.int4, tile=32),
    }


def aqt_models() -> dict:
    """AQT v2 (``aqtp``) QAT of ``CNN1D``: its dot_general / conv injected into every layer.

    Forward only (``bwd_bits=None``: float gradients, like the other QAT rows);
    lhs = layer input, rhs = kernel, each scaled per row / per output channel.
    AQT has no injection-free path for linen convolutions, hence the injected
    classes; AQT's weights-only group (tiled) config is not mapped here.
    """
    try:
        from aqt.jax.v2 import aqt_conv_general, aqt_dot_general
        from aqt.jax.v2 import config as aqt_config
        from aqt.jax.v2.flax import aqt_flax
    except ImportError:
        return {}

    def aqt_model(weight_bits, act_bits):
        dense_cfg = aqt_dot_general.dot_general_make(lhs_bits=act_bits, rhs_bits=weight_bits)
        raw = aqt_conv_general.conv_general_dilated_make(
            1, lhs_bits=act_bits, rhs_bits=weight_bits, initialize_calibration=False)
        for side in (raw.dg_quantizer.lhs, raw.dg_quantizer.rhs):
            if side is not None and side.numerics is not None:
                side.init_calibration()
        conv_cfg = aqt_config.default_unquantized_config()
        conv_cfg.fwd = raw
        return CNN1D(
            dot_general_cls=functools.partial(aqt_flax.AqtDotGeneral, dense_cfg, prng_name=None),
            conv_general_dilated_cls=functools.partial(aqt_flax.AqtConvGeneralDilated, conv_cfg,
                                                       prng_name=None))

    return {
        "aqt-w8a8": aqt_model(8, 8),
        "aqt-w4a8": aqt_model(4, 8),
        "aqt-w4a4": aqt_model(4, 4),
        "aqt-w4": aqt_model(4, None),
    }
