"""CausalLM = token embedding -> N pre-norm blocks (mixer, FFN, residuals) -> RMSNorm -> head.

With `model.recursion` set the blocks are a Mixture-of-Recursions stack instead
(arch/mixture_of_recursions.py): shared layers applied up to N_r times, routed per token. With
`model.depth_routing`, every n-th block is a Mixture-of-Depths block (arch/mixture_of_depths.py)
that only the tokens its router keeps go through.

The per-layer mixer and FFN names come from `ModelConfig.mixers` / `ffns` through the registry.
Logits are float32 `[B, T, vocab]`. With a `cache` (from `init_cache`) the call also returns the
new cache, for decoding. Under a mesh, the residual stream is constrained to ("batch", "length",
"act_embed") and the logits to ("batch", "length", "vocab") (layers.sharding.RULES); without one
the constraints are no-ops.
"""

import jax.numpy as jnp
from flax import nnx

from hybrax.arch.block import Block
from hybrax.arch.config import ModelConfig
from hybrax.arch.mixture_of_depths import DepthRoutedBlock
from hybrax.arch.mixture_of_recursions import MixtureOfRecursions
from hybrax.layers.embeddings import TokenEmbedding
from hybrax.layers.norms import RMSNorm
from hybrax.layers.parameters import logical_param, normal
from hybrax.layers.sharding import constrain

RESIDUAL = ("batch", "length", "act_embed")


class CausalLM(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self.embed = TokenEmbedding(c.vocab_size, c.d_model, init_std=c.init_std, dtype=c.dtype,
                                    param_dtype=c.param_dtype, rngs=rngs)
        if c.embedding_norm:   # the 8-bit optimizers paper's stable embedding: normalized embedding outputs
            self.embed_norm = RMSNorm(c.d_model, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        if c.recursion is None:   # with model.depth_routing, every n-th block routed (arch/mixture_of_depths.py)
            blocks = [Block(c, m, f, rngs=rngs) for m, f in c.layer_pattern()]
            self.blocks = nnx.List([DepthRoutedBlock(c, b, rngs=rngs) if c.depth_routed(i) else b
                                    for i, b in enumerate(blocks)])
        else:   # the blocks as a shared stack applied up to N_r times (arch/mixture_of_recursions.py)
            self.recursions = MixtureOfRecursions(c, rngs=rngs)
        self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        if not c.tie_embeddings:
            self.head = logical_param(rngs, normal(c.init_std), (c.d_model, c.vocab_size), c.param_dtype,
                                      ("embed", "vocab"))

    def init_cache(self, batch: int, max_len: int):
        if self.config.recursion is not None:
            return self.recursions.init_cache(batch, max_len)
        return [block.init_cache(batch, max_len) for block in self.blocks]

    def __call__(self, tokens_BxT, *, segment_ids=None, positions=None, cache=None, modality_ids=None):
        x_BxTxD = self.embed(tokens_BxT)
        if self.config.embedding_norm:
            x_BxTxD = self.embed_norm(x_BxTxD)
        x_BxTxD = constrain(x_BxTxD, RESIDUAL)
        if self.config.recursion is not None:
            if modality_ids is not None:
                raise ValueError("modality_ids (MoMa) are not supported with model.recursion")
            out = self.recursions(x_BxTxD, segment_ids=segment_ids, positions=positions, cache=cache)
            x_BxTxD, new_caches = out if cache is not None else (out, None)
            return self._logits(constrain(x_BxTxD, RESIDUAL), cache, new_caches)
        new_caches = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            if self.config.remat and cache is None:
                x_BxTxD, _ = nnx.remat(lambda blk, x: blk(x, segment_ids=segment_ids, positions=positions,
                                                          modality_ids=modality_ids))(block, x_BxTxD)
            else:
                x_BxTxD, layer_cache = block(x_BxTxD, segment_ids=segment_ids, positions=positions, cache=layer_cache,
                                             modality_ids=modality_ids)
            x_BxTxD = constrain(x_BxTxD, RESIDUAL)
            new_caches.append(layer_cache)
        return self._logits(x_BxTxD, cache, new_caches)

    def _logits(self, x_BxTxD, cache, new_caches):
        x_BxTxD = self.final_norm(x_BxTxD)
        if self.config.tie_embeddings:
            logits_BxTxV = self.embed.attend(x_BxTxD)
        else:
            dtype = jnp.dtype(self.config.dtype)
            logits_BxTxV = jnp.einsum("btd,dv->btv", x_BxTxD.astype(dtype), self.head[...].astype(dtype),
                                      preferred_element_type=jnp.float32)
        logits_BxTxV = constrain(logits_BxTxV, ("batch", "length", "vocab"))
        return logits_BxTxV if cache is None else (logits_BxTxV, new_caches)
