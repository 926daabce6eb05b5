"""CausalLM = token embedding -> N pre-norm blocks (mixer, FFN, residuals) -> RMSNorm -> head.

The per-layer mixer and FFN names come from `ModelConfig.mixers` / `ffns` through the registry.
Logits are float32 `[B, T, vocab]`. With a `cache` (from `init_cache`) the call also returns the
new cache, for decoding. Under a mesh, the residual stream is constrained to ("batch", "length",
"act_embed") and the logits to ("batch", "length", "vocab") (layers.sharding.RULES); without one
the constraints are no-ops.
"""

import jax.numpy as jnp
from flax import nnx

from hybrax.arch.config import ModelConfig
from hybrax.arch.registry import FFNS, MIXERS
from hybrax.layers.embeddings import TokenEmbedding
from hybrax.layers.norms import RMSNorm
from hybrax.layers.parameters import logical_param, normal
from hybrax.layers.sharding import constrain

RESIDUAL = ("batch", "length", "act_embed")


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, mixer: str, ffn: str, *, rngs: nnx.Rngs):
        kw = dict(eps=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.mixer_norm = RMSNorm(config.d_model, **kw)
        self.mixer = MIXERS.build(mixer, config, rngs=rngs)
        self.ffn_norm = RMSNorm(config.d_model, **kw)
        self.ffn = FFNS.build(ffn, config, rngs=rngs)

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None):
        mixed = self.mixer(self.mixer_norm(x_BxTxD), segment_ids=segment_ids, positions=positions, cache=cache)
        new_cache = None
        if cache is not None:
            mixed, new_cache = mixed
        x_BxTxD = x_BxTxD + mixed
        x_BxTxD = x_BxTxD + self.ffn(self.ffn_norm(x_BxTxD))
        return x_BxTxD, new_cache


class CausalLM(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self.embed = TokenEmbedding(c.vocab_size, c.d_model, init_std=c.init_std, dtype=c.dtype,
                                    param_dtype=c.param_dtype, rngs=rngs)
        self.blocks = nnx.List([Block(c, m, f, rngs=rngs) for m, f in c.layer_pattern()])
        self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        if not c.tie_embeddings:
            self.head = logical_param(rngs, normal(c.init_std), (c.d_model, c.vocab_size), c.param_dtype,
                                      ("embed", "vocab"))

    def init_cache(self, batch: int, max_len: int) -> list:
        return [block.mixer.init_cache(batch, max_len) for block in self.blocks]

    def __call__(self, tokens_BxT, *, segment_ids=None, positions=None, cache=None):
        x_BxTxD = constrain(self.embed(tokens_BxT), RESIDUAL)
        new_caches = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            if self.config.remat and cache is None:
                x_BxTxD, _ = nnx.remat(lambda blk, x: blk(x, segment_ids=segment_ids, positions=positions))(block, x_BxTxD)
            else:
                x_BxTxD, layer_cache = block(x_BxTxD, segment_ids=segment_ids, positions=positions, cache=layer_cache)
            x_BxTxD = constrain(x_BxTxD, RESIDUAL)
            new_caches.append(layer_cache)
        x_BxTxD = self.final_norm(x_BxTxD)
        if self.config.tie_embeddings:
            logits_BxTxV = self.embed.attend(x_BxTxD)
        else:
            dtype = jnp.dtype(self.config.dtype)
            logits_BxTxV = jnp.einsum("btd,dv->btv", x_BxTxD.astype(dtype), self.head[...].astype(dtype),
                                      preferred_element_type=jnp.float32)
        logits_BxTxV = constrain(logits_BxTxV, ("batch", "length", "vocab"))
        return logits_BxTxV if cache is None else (logits_BxTxV, new_caches)
