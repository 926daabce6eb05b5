"""Token embedding (optionally tied to the output head) and rotary position embedding.

Rotary embedding (Su et al., 2021, RoFormer): each pair (x_i, x_{i+D/2}) of a head vector is
rotated by angle `position * theta^(-2i/D)`, so q.k depends only on the relative position.
"""

import jax.numpy as jnp
from flax import nnx

from hybrax.layers.parameters import logical_param, normal


class TokenEmbedding(nnx.Module):
    """`vocab_size * d_model` parameters; `attend` is the tied output head."""

    def __init__(self, vocab_size: int, d_model: int, *, init_std: float = 0.02, dtype="float32",
                 param_dtype="float32", rngs: nnx.Rngs):
        self.dtype = jnp.dtype(dtype)
        self.embedding = logical_param(rngs, normal(init_std), (vocab_size, d_model), param_dtype,
                                       ("vocab", "embed"))

    def __call__(self, tokens_BxT: jnp.ndarray) -> jnp.ndarray:
        return jnp.take(self.embedding[...], tokens_BxT, axis=0).astype(self.dtype)

    def attend(self, x_BxTxD: jnp.ndarray) -> jnp.ndarray:
        """Logits against the embedding matrix, in float32."""
        return jnp.einsum("btd,vd->btv", x_BxTxD.astype(self.dtype),
                          self.embedding[...].astype(self.dtype), preferred_element_type=jnp.float32)


def apply_rotary(x_BxTxHxD: jnp.ndarray, positions_BxT: jnp.ndarray, theta: float) -> jnp.ndarray:
    """Rotate the two halves of each head vector by position-dependent angles (float32 math)."""
    half = x_BxTxHxD.shape[-1] // 2
    inv_freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_F
    cos, sin = jnp.cos(angle_BxTxF)[:, :, None, :], jnp.sin(angle_BxTxF)[:, :, None, :]
    x = x_BxTxHxD.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxTxHxD.dtype)
