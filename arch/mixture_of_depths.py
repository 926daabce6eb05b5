"""Mixture-of-Depths (Raposo et al., 2024; with MoMa's modality experts in Lin et al., 2024): a
block that only some tokens take (settings: `DepthRoutingConfig` in arch/config.py).

    l_t = x_t w                                  (the router logit, float32)
    kept = the C = ceil(capacity T) tokens of the row with the highest l   (training)
         = the tokens with l > 0                                         (evaluation, decoding)
    y_t = x_t + sigmoid(l_t) (block(x_kept)_t - x_t)    for t in kept;   y_t = x_t otherwise

Static shapes: in training the row is reordered so the kept tokens come first, in order of
position, and exactly C of them go through the block as a shorter sequence [B, C, D] (their own
positions for rotary, their segment and modality ids), then are scattered back
(arch/token_routing.py). Evaluation takes every token with l > 0 at full length T: the others sit
after every kept one, so causal mixers never let them touch a kept token, and their results are
dropped.

Top-C reads the whole row, so training is not causal. The auxiliary loss BCE(l, kept)
(`router_aux_loss_weight`) teaches l > 0 to predict the choice, which evaluation and decoding use:
causal. Metrics (training): `mismatch`, the share of tokens where (l > 0) disagrees with top-C, and
`inference_share`, the share with l > 0.

Decoding (`init_cache`, then calls with `cache`): rows decode independently (vmap over rows, a scan
over a call's tokens), because each row keeps its own tokens; a token with l <= 0 skips the block
and writes nothing into its cache, so the block's cache holds only its kept tokens (about capacity
of them), and the cache counts positions itself for rotary embeddings. Not under sequence
parallelism (`seq` > 1): reordering a row needs all of it on one device.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from hybrax.arch.block import Block
from hybrax.arch.config import ModelConfig
from hybrax.arch.token_routing import compact, gather_rows, scatter_add_rows, top_k_mask
from hybrax.layers.auxiliary import report_loss, report_metric
from hybrax.layers.moe.balancing import expert_choice_loss
from hybrax.layers.parameters import logical_param, normal
from hybrax.layers.sequence_parallel.layout import seq_size


class DepthRoutedBlock(nnx.Module):
    """A `Block` that only the tokens its router keeps go through (module docstring)."""

    def __init__(self, config: ModelConfig, block: Block, *, rngs: nnx.Rngs):
        self.block = block
        self.routing = config.depth_routing
        self.router = logical_param(rngs, normal(config.init_std), (config.d_model,), config.param_dtype, ("embed",))
        self.deterministic = True

    def _logit(self, x_BxTxD):
        return jnp.einsum("btd,d->bt", x_BxTxD.astype(jnp.float32), self.router[...].astype(jnp.float32))

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None, modality_ids=None):
        if cache is not None:
            return self._decode(x_BxTxD, positions, modality_ids, cache)
        if seq_size() > 1:
            raise ValueError("model.depth_routing (Mixture-of-Depths) reorders each row's tokens and needs whole rows "
                             "on a device: use a mesh without seq > 1")
        B, T, _ = x_BxTxD.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        logit_BxT = self._logit(x_BxTxD)
        if not self.deterministic:
            kept_BxT, slots = top_k_mask(logit_BxT, self.routing.slots(T)), self.routing.slots(T)
            bce, mismatch = expert_choice_loss(logit_BxT, kept_BxT, jnp.ones((B, T), bool))
            if self.routing.router_aux_loss_weight:
                report_loss(self, "router_bce", self.routing.router_aux_loss_weight * bce)
            report_metric(self, "mismatch", mismatch)
            report_metric(self, "inference_share", jnp.mean((logit_BxT > 0).astype(jnp.float32)))
        else:
            kept_BxT, slots = logit_BxT > 0, T
        index_BxC, kept_BxC = compact(kept_BxT, slots)
        take = lambda a: None if a is None else gather_rows(a, index_BxC)  # noqa: E731
        x_BxCxD = gather_rows(x_BxTxD, index_BxC)
        y_BxCxD, _ = self.block(x_BxCxD, segment_ids=take(segment_ids), positions=take(positions),
                                modality_ids=take(modality_ids))
        gate_BxC = jax.nn.sigmoid(gather_rows(logit_BxT, index_BxC))
        update_BxCxD = gate_BxC[..., None] * (y_BxCxD - x_BxCxD).astype(jnp.float32)
        update_BxCxD = jnp.where(kept_BxC[..., None], update_BxCxD, 0.0)
        return scatter_add_rows(x_BxTxD, index_BxC, update_BxCxD), None

    # ---- decoding ---------------------------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int) -> dict:
        """Per row: the block's cache (of the kept tokens only) and the next position."""
        row = {"block": self.block.init_cache(1, max_len), "position": jnp.zeros((), jnp.int32)}
        return jax.tree.map(lambda a: jnp.broadcast_to(a[None], (batch,) + a.shape), row)

    def _decode(self, x_BxTxD, positions, modality_ids, cache):
        B, T, _ = x_BxTxD.shape
        if positions is None:
            positions = cache["position"][:, None] + jnp.arange(T, dtype=jnp.int32)
        has_modalities = modality_ids is not None
        modality_ids = modality_ids if has_modalities else jnp.zeros((B, T), jnp.int32)

        def token(cache, inputs):
            x_D, position, modality = inputs
            x, kw = x_D[None, None], dict(positions=position[None, None])
            if has_modalities:
                kw["modality_ids"] = modality[None, None]
            logit = self._logit(x)[0, 0]

            def take(args):
                x, block_cache = args
                y, block_cache = self.block(x, cache=block_cache, **kw)
                return (x + jax.nn.sigmoid(logit) * (y - x).astype(jnp.float32)).astype(x.dtype), block_cache

            x, block_cache = jax.lax.cond(logit > 0, take, lambda args: args, (x, cache["block"]))
            return {"block": block_cache, "position": cache["position"] + 1}, x[0, 0]

        rows = jax.vmap(lambda c, x, p, m: jax.lax.scan(token, c, (x, p, m)))
        cache, y_BxTxD = rows(cache, x_BxTxD, positions, modality_ids)
        return y_BxTxD, cache
