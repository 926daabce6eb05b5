"""MoMa (Lin et al., 2024): a mixture of experts whose experts are split into one group per modality;
a token is routed only among its own modality's experts. Settings: `MoMaConfig` (moma_config.py).

    modality m owns experts [o_m, o_m + E_m)           (o_m = E_0 + ... + E_{m-1})
    allowed[t, e] = modality_ids[t] == modality of e
    token_choice:  the MoE layer's top_k routing with the router's logits masked to `allowed`,
                   then its dispatch (dropless or capacity, expert parallel under `expert` > 1)
    expert_choice: affinities s[t, e] = softmax over t's allowed experts; each expert e takes the
                   C = ceil(T c / E) allowed tokens of the row with the highest s[:, e], and adds
                   s[t, e] SwiGLU_e(x_t) to them (slots left empty when fewer tokens are allowed)

Expert choice reads the whole row, so training is not causal. In training mode the layer also
reports BCE(logit[t, e], chosen[t, e]) over the allowed pairs (`router_aux_loss_weight`), which
teaches logit > 0 to predict the choice, and `mismatch`, the share of allowed pairs where the two
disagree; evaluation and decoding route every token to the experts of its group whose logit is
> 0 (weights s[t, e]), computed as a dropless dispatch over the whole group: causal. Token choice
is causal everywhere. `modality_ids` None means modality 0 for every token.

Reports in training mode (layers/auxiliary): `balance_loss` (token choice: the MoE switch loss
over the experts of every group), `router_z_loss`, `load` [E], `modality_share` [M] (share of the
tokens of each modality) and, for expert choice, `router_bce` and `mismatch`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from hybrax.layers.auxiliary import report_loss, report_metric
from hybrax.layers.moe import balancing, expert_parallel
from hybrax.layers.moe.capacity import capacity, slots_ffn
from hybrax.layers.moe.dropless import dropless
from hybrax.layers.moe.layer import MoE
from hybrax.layers.moe.moma_config import MoMaConfig
from hybrax.layers.moe.router import route


class MoMa(MoE):
    takes_modalities = True   # the Block passes modality_ids

    def __init__(self, config: MoMaConfig, *, rngs):
        super().__init__(config, rngs=rngs)
        self.expert_modality = tuple(int(m) for m in np.repeat(np.arange(config.num_modalities),
                                                                config.experts_per_modality))

    def allowed(self, modality_N) -> jax.Array:
        """bool [N, E]: the experts of each token's modality."""
        return jnp.asarray(self.expert_modality)[None, :] == modality_N[:, None]

    def __call__(self, x_BxTxD: jax.Array, modality_ids=None) -> jax.Array:
        c = self.config
        B, T, D = x_BxTxD.shape
        if modality_ids is None:
            modality_ids = jnp.zeros((B, T), jnp.int32)
        # an id outside [0, M) would leave a token no expert: clamped (eager callers get the data's check)
        modality_N = jnp.clip(modality_ids.reshape(B * T).astype(jnp.int32), 0, c.num_modalities - 1)
        allowed_NxE = self.allowed(modality_N)
        logits_NxE = jnp.einsum("nd,de->ne", x_BxTxD.reshape(B * T, D).astype(jnp.float32),
                                self.router[...].astype(jnp.float32))
        experts = (self.w_gate[...], self.w_up[...], self.w_down[...])
        if c.routing == "token_choice":
            y_BxTxD = self._token_choice(x_BxTxD, logits_NxE, allowed_NxE, experts)
        elif self.deterministic:
            y_BxTxD = self._by_logit(x_BxTxD, logits_NxE, allowed_NxE, modality_N, experts)
        else:
            y_BxTxD = self._expert_choice(x_BxTxD, logits_NxE, allowed_NxE, experts)
        if self.shared is not None:
            y_BxTxD = y_BxTxD + self.shared(x_BxTxD).astype(jnp.float32)
        if not self.deterministic:
            share_M = jnp.stack([jnp.mean((modality_ids == m).astype(jnp.float32)) for m in range(c.num_modalities)])
            report_metric(self, "modality_share", share_M)
        return y_BxTxD.astype(c.dtype)

    # ---- token choice: the MoE layer's routing inside the group -----------------------------------

    def _token_choice(self, x_BxTxD, logits_NxE, allowed_NxE, experts):
        c = self.config
        B, T, D = x_BxTxD.shape
        K = c.top_k
        r = route(logits_NxE, self.expert_bias[...], score=c.score, top_k=K, renormalize=c.renormalize,
                  allowed_NxE=allowed_NxE)
        kept_BxTxK = None
        if c.dispatch == "dropless":
            run = expert_parallel.dropless if expert_parallel.expert_axis_size() > 1 else dropless
            extra = {"exchange": c.exchange} if expert_parallel.expert_axis_size() > 1 else {}
            y_BxTxD = run(x_BxTxD.reshape(B * T, D), r.experts_NxK, r.weights_NxK, *experts, dtype=c.dtype,
                          implementation=c.implementation, **extra).reshape(B, T, D)
        else:
            run = expert_parallel.capacity if expert_parallel.expert_axis_size() > 1 else capacity
            y_BxTxD, kept_BxTxK = run(x_BxTxD, r.experts_NxK.reshape(B, T, K), r.weights_NxK.reshape(B, T, K),
                                      *experts, capacity=c.capacity(T), dtype=c.dtype)
        if not self.deterministic:
            self._balance(r, kept_BxTxK, B, T)
        return y_BxTxD

    # ---- expert choice ----------------------------------------------------------------------------

    def _affinities(self, logits_NxE, allowed_NxE):
        """s [N, E]: softmax over each token's allowed experts (0 elsewhere)."""
        return jax.nn.softmax(jnp.where(allowed_NxE, logits_NxE, -jnp.inf), axis=-1)

    def _expert_choice(self, x_BxTxD, logits_NxE, allowed_NxE, experts):
        """Training: each expert takes its C best allowed tokens of the row."""
        c = self.config
        B, T, D = x_BxTxD.shape
        E, C = c.num_experts, c.expert_slots(T)
        s_BxTxE = self._affinities(logits_NxE, allowed_NxE).reshape(B, T, E)
        allowed_BxTxE = allowed_NxE.reshape(B, T, E)
        ranking_BxExT = jnp.where(allowed_BxTxE, jax.lax.stop_gradient(s_BxTxE), -1.0).transpose(0, 2, 1)
        best_BxExC, token_BxExC = jax.lax.top_k(ranking_BxExT, min(C, T))
        filled_BxExC = best_BxExC >= 0                                          # an allowed token in the slot
        onehot_BxExCxT = jax.nn.one_hot(token_BxExC, T, dtype=jnp.float32) * filled_BxExC[..., None]
        dispatch_BxTxExC = onehot_BxExCxT.transpose(0, 3, 1, 2)
        weight_BxExC = jnp.take_along_axis(s_BxTxE.transpose(0, 2, 1), token_BxExC, axis=-1)
        combine_BxTxExC = dispatch_BxTxExC * weight_BxExC[:, None]
        run = expert_parallel.slots_ffn if expert_parallel.expert_axis_size() > 1 else slots_ffn
        y_BxTxD = run(x_BxTxD, dispatch_BxTxExC, combine_BxTxExC, *experts, dtype=c.dtype)
        chosen_BxTxE = jnp.sum(dispatch_BxTxExC, axis=-1) > 0
        self._report_expert_choice(logits_NxE, allowed_NxE, chosen_BxTxE.reshape(B * T, E), s_BxTxE)
        return y_BxTxD

    def _by_logit(self, x_BxTxD, logits_NxE, allowed_NxE, modality_N, experts):
        """Evaluation and decoding: each token to every expert of its group whose logit is > 0."""
        c = self.config
        B, T, D = x_BxTxD.shape
        s_NxE = self._affinities(logits_NxE, allowed_NxE)
        take_NxE = allowed_NxE & (logits_NxE > 0)
        # every token's group as K = the largest group's experts (smaller groups repeat their last one, weight 0)
        K = max(c.experts_per_modality)
        offsets = np.concatenate([[0], np.cumsum(c.experts_per_modality)])
        table_MxK = np.stack([offsets[m] + np.minimum(np.arange(K), size - 1)
                              for m, size in enumerate(c.experts_per_modality)])
        experts_NxK = jnp.asarray(table_MxK, jnp.int32)[modality_N]
        first_K = np.arange(K)[None, :] < np.asarray(c.experts_per_modality)[:, None]       # [M, K]
        real_NxK = jnp.asarray(first_K)[modality_N]
        weights_NxK = jnp.where(real_NxK & jnp.take_along_axis(take_NxE, experts_NxK, axis=-1),
                                jnp.take_along_axis(s_NxE, experts_NxK, axis=-1), 0.0)
        run = expert_parallel.dropless if expert_parallel.expert_axis_size() > 1 else dropless
        y_NxD = run(x_BxTxD.reshape(B * T, D), experts_NxK, weights_NxK, *experts, dtype=c.dtype,
                    implementation=c.implementation)
        return y_NxD.reshape(B, T, D)

    def _report_expert_choice(self, logits_NxE, allowed_NxE, chosen_NxE, s_BxTxE) -> None:
        c = self.config
        bce, mismatch = balancing.expert_choice_loss(logits_NxE, chosen_NxE, allowed_NxE)
        if c.router_aux_loss_weight:
            report_loss(self, "router_bce", c.router_aux_loss_weight * bce)
        if c.z_loss_weight:
            report_loss(self, "router_z_loss", c.z_loss_weight * balancing.z_loss(
                jnp.where(allowed_NxE, logits_NxE, -jnp.inf)))
        report_metric(self, "mismatch", mismatch)
        counts_E = jnp.sum(chosen_NxE.astype(jnp.float32), axis=0)
        report_metric(self, "load", counts_E / jnp.maximum(jnp.sum(counts_E), 1.0))
