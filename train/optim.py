"""AdamW with linear warmup, cosine decay and global-norm clipping (the default recipe)."""

import jax
import optax

from hybrax.train.config import OptimConfig


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=config.lr * config.min_lr_ratio)


def _decay_mask(params):
    """Weight decay on matrices only; norms' scales stay undecayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(config, total_steps), b1=config.beta1, b2=config.beta2,
                        eps=config.eps, weight_decay=config.weight_decay, mask=_decay_mask)
    # The chain keeps one state structure with or without clipping, so either resumes the other.
    clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)
