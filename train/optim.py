"""The optimizer of a run, by `optim.name`, with linear warmup, cosine decay and global-norm
clipping around it:

    adamw           optax AdamW, 32-bit moments (8 bytes of state per parameter)
    adamw8bit       both moments in 8 bits, block-wise dynamic quantization (train/optimizers/adamw8bit.py)
    galore          Adam in a rank-r gradient subspace of each matrix (train/optimizers/galore.py)
    natural_galore  the same, on the low-rank gradient preconditioned by its inverse empirical Fisher
    frugal          AdamW on a part of each gradient, signSGD on the rest (train/optimizers/frugal.py)

Each takes its knobs from `optim.<name>.*`. `state_bytes` counts a state tree's bytes exactly.
"""

import jax
import numpy as np
import optax

from hybrax.train.config import ConfigError, OptimConfig


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=config.lr * config.min_lr_ratio)


def _decay_mask(params):
    """Weight decay on matrices only; norms' scales stay undecayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _transformation(config: OptimConfig, schedule) -> optax.GradientTransformation:
    if config.name == "adamw":
        return optax.adamw(schedule, b1=config.beta1, b2=config.beta2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=_decay_mask)
    if config.name == "adamw8bit":
        from hybrax.train.optimizers.adamw8bit import adamw8bit
        return adamw8bit(config, schedule)
    if config.name in ("galore", "natural_galore"):
        from hybrax.train.optimizers.galore import galore
        return galore(config, schedule, natural=config.name == "natural_galore")
    if config.name == "frugal":
        from hybrax.train.optimizers.frugal import frugal
        return frugal(config, schedule)
    raise ConfigError(f"optim.name={config.name!r} is not an optimizer; valid: adamw, adamw8bit, galore, "
                      "natural_galore, frugal")


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    # The chain keeps one state structure with or without clipping, so either resumes the other.
    clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity()
    return optax.chain(clip, _transformation(config, learning_rate_schedule(config, total_steps)))


def state_bytes(tree) -> int:
    """Bytes of every array in a (possibly abstract) state tree."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def device_state_bytes(tree, device=None) -> int:
    """Bytes of a sharded state tree that one device (default: the first) holds."""
    device = jax.devices()[0] if device is None else device
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)
