"""AdamW with both moments in 8 bits (Dettmers et al., 2022): block-wise dynamic quantization.

Each step dequantizes a parameter's moments, takes the AdamW step in float32 and requantizes them
with fresh block absmaxes; under jit the float32 moments are temporaries of the one fused update,
so none outlives the step. The first moment uses the signed dynamic map, the second the unsigned
one (train.optimizers.block_quantization). State per quantized parameter: two uint8 arrays of its
shape and two float32 absmax arrays, 2 + 8 / block_elements bytes per element.

Kept in 32 bits, as in bitsandbytes: parameters of fewer than `min_size` elements (norm scales),
and with `stable_embedding` the token embedding, whose rows see very uneven gradients (the paper's
stable embedding also normalizes the embedding's output: model.embedding_norm, which
`optim.adamw8bit.stable_embedding=true` switches on).
"""

import math

import jax.numpy as jnp

from hybrax.train.optimizers.block_quantization import Quantizer, block_layout
from hybrax.train.optimizers.parameters import (adam_direction, adam_moments, adamw_step, apply_per_parameter,
                                                full_moments, names_of, state_variable, value)

SIGNED, UNSIGNED = Quantizer(signed=True), Quantizer(signed=False)


def adamw8bit(optim, schedule):
    """optim: train.config.OptimConfig (beta1, beta2, eps, weight_decay and optim.adamw8bit)."""
    knobs = optim.adamw8bit

    def quantized(path: str, variable) -> bool:
        if math.prod(value(variable).shape) < knobs.min_size:
            return False
        return not (knobs.stable_embedding and "vocab" in names_of(variable))

    def init_one(path, index, variable):
        if not quantized(path, variable):
            return full_moments(variable)
        shape, names = value(variable).shape, names_of(variable)
        layout = block_layout(shape, knobs.block_size)
        # a zero block has absmax 0, so its codes decode to 0 whatever they are
        return {f"{moment}_{part}": state_variable(zeros, part_names) for moment in ("mu", "nu")
                for part, zeros, part_names in (("codes", jnp.zeros(shape, jnp.uint8), names),
                                                ("absmax", jnp.zeros(layout.absmax_shape, jnp.float32),
                                                 names[:layout.axis + 1]))}

    def update_one(path, index, grad, state, variable, count):
        lr, param = schedule(count - 1), value(variable)
        decay = optim.weight_decay * param if param.ndim >= 2 else 0.0
        if "mu" in state:
            direction, state = adamw_step(state, grad, count, optim)
            return -lr * (direction + decay), state
        layout = block_layout(param.shape, knobs.block_size)
        mu = SIGNED.dequantize(value(state["mu_codes"]), value(state["mu_absmax"]), layout)
        nu = UNSIGNED.dequantize(value(state["nu_codes"]), value(state["nu_absmax"]), layout)
        mu, nu = adam_moments(mu, nu, grad, optim.beta1, optim.beta2)
        direction = adam_direction(mu, nu, count, optim.beta1, optim.beta2, optim.eps)
        mu_codes, mu_absmax = SIGNED.quantize(mu, layout)
        nu_codes, nu_absmax = UNSIGNED.quantize(nu, layout)
        new = {"mu_codes": state["mu_codes"].replace(mu_codes), "mu_absmax": state["mu_absmax"].replace(mu_absmax),
               "nu_codes": state["nu_codes"].replace(nu_codes), "nu_absmax": state["nu_absmax"].replace(nu_absmax)}
        return -lr * (direction + decay), new

    return apply_per_parameter(init_one, update_one)
