"""Mixture-of-Recursions (Bae et al., 2025): the blocks of a CausalLM as a shared stack applied up to
N_r times, with routers deciding which tokens take each further step (settings: `RecursionConfig`
in arch/config.py).

    x = first unique blocks(x)                         (middle_cycle: one; cycle: none)
    for r in 0 .. N_r - 1:                             the shared stack f, once per step
        chosen_r = tokens of the row that step r takes (among those step r - 1 took)
        x_t += g_t (f(x)_t - x_t)    for t in chosen_r (g: the router's gate, 1 on unrouted steps)
    x = last unique blocks(x)                          (middle_cycle: one)

Static shapes: step r takes a fixed number of tokens per row, C_r = ceil(capacity[r] T). The row is
reordered so that the chosen tokens come first, in order of position, and the first C_r go through
the stack as a shorter sequence [B, C_r, D] (their own positions for rotary, their segment ids),
then are scattered back. Unchosen tokens that fill the slots left over sit after every chosen one,
so causal mixers never let them touch a chosen token, and their results are dropped. A step at
capacity 1 takes every token still active (no router, gate 1): with N_r = 1 and capacity 1 the
model is the plain CausalLM of the same layers.

Routing (config `routing`):
- expert_choice: at a step of capacity < 1 the router logit l = x w_r (float32) ranks the active
  tokens and the top C_r go on, gated by sigmoid(l). Top-k looks at the whole row, so training is
  not causal. The auxiliary loss BCE(l, chosen) over the active tokens teaches l > 0 to predict the
  choice; evaluation and decoding take the active tokens with l > 0 (no capacity), which is causal.
  The metric `mismatch_<r>` is the share of active tokens where (l > 0) disagrees with top-k.
- token_choice: before the first step, softmax(x W) over the depths 1..N_r picks each token's
  depth n_t and its gate p_t(n_t); step r >= 1 takes the tokens with n_t > r still active, the
  first C_r by position (an overflowing token stops there: dropping by position is causal). The
  switch loss over the depths balances them. Causal in training, evaluation and decoding.
- none: every token takes every step (a plain recursive transformer).
Metrics (training mode): `depth_share` (the share of tokens each step took, [N_r]) and, for
token_choice, `assigned_share` (the router's depths before capacity).

KV caches (decoding: `init_cache`, then calls with `cache`): rows decode independently (vmap over
rows, a scan over a call's tokens) because each row chooses its own tokens. `per_recursion`: every
step keeps its own cache for the shared layers and a token writes its keys and values only into the
caches of the steps that took it, so step r stores about capacity[r] of the tokens. `shared`: the
steps after the first read the first step's keys and values (every token's, with the causal mask
by position) and keep no cache of their own; in training, the same: step r >= 1 attends from its
chosen tokens to the first step's keys and values of the whole row. It needs attention mixers in
the shared stack. A token-choice cache holds the capacities of a row of max_len tokens, so decoding
equals the parallel forward over max_len tokens.

Not under sequence parallelism (`seq` > 1): reordering a row needs all of it on one device.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrax.arch.block import Block
from hybrax.arch.config import ModelConfig
from hybrax.arch.token_routing import compact, gather_rows, scatter_add_rows, top_k_mask
from hybrax.layers.auxiliary import report_loss, report_metric
from hybrax.layers.moe.balancing import expert_choice_loss
from hybrax.layers.embeddings import apply_rotary
from hybrax.layers.parameters import logical_param, normal
from hybrax.layers.partitioned import dot_product_attention
from hybrax.layers.projection import project
from hybrax.layers.sequence_parallel.layout import seq_size
from hybrax.layers.softmax.attention import Attention


class MixtureOfRecursions(nnx.Module):
    """The block stack of a CausalLM whose `config.recursion` is set (see the module docstring)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c, rc = config, config.recursion
        self.config, self.recursion = c, rc
        blocks = [Block(c, m, f, rngs=rngs) for m, f in c.layer_pattern()]
        ends = 1 if rc.sharing == "middle_cycle" else 0
        self.first = nnx.List(blocks[:ends])
        self.shared = nnx.List(blocks[ends:len(blocks) - ends])
        self.last = nnx.List(blocks[len(blocks) - ends:])
        self.capacities = tuple(rc.capacities())
        if rc.routing != "none":
            self.router = logical_param(rngs, normal(c.init_std), (c.d_model, rc.num_recursions), c.param_dtype,
                                        ("embed", None))
        if rc.kv_cache == "shared":
            for block in self.shared:
                if type(block.mixer) is not Attention:
                    raise ValueError(f"model.recursion.kv_cache=shared reads the first recursion's keys and values: "
                                     f"the shared layers must be attention, got {type(block.mixer).__name__}")
        self.deterministic = True

    # ---- routing ---------------------------------------------------------------------------------

    def routed(self, r: int) -> bool:
        """Whether step r has a router (expert_choice below capacity 1; token_choice after step 0)."""
        rc = self.recursion
        if rc.routing == "expert_choice":
            return self.capacities[r] < 1
        return rc.routing == "token_choice" and r > 0

    def _logits(self, x_BxTxD):
        """The router's logits over every column [B, T, N_r] (token_choice), float32."""
        return jnp.einsum("btd,dn->btn", x_BxTxD.astype(jnp.float32), self.router[...].astype(jnp.float32))

    def _logit(self, x_BxTxD, r: int):
        """Step r's router logit [B, T] (expert_choice), float32."""
        return jnp.einsum("btd,d->bt", x_BxTxD.astype(jnp.float32), self.router[:, r].astype(jnp.float32))

    def _depths(self, x_BxTxD):
        """token_choice: (depth index n_t - 1 int32 [B, T], gate p_t(n_t) [B, T], probs [B, T, N_r])."""
        probs_BxTxN = jax.nn.softmax(self._logits(x_BxTxD), axis=-1)
        depth_BxT = jnp.argmax(probs_BxTxN, axis=-1).astype(jnp.int32)
        return depth_BxT, jnp.take_along_axis(probs_BxTxN, depth_BxT[..., None], axis=-1)[..., 0], probs_BxTxN

    # ---- the shared stack --------------------------------------------------------------------------

    def _run(self, blocks, x_BxTxD, segment_ids, positions):
        for block in blocks:
            if self.config.remat:
                x_BxTxD, _ = nnx.remat(lambda blk, x, s, p: blk(x, segment_ids=s, positions=p))(
                    block, x_BxTxD, segment_ids, positions)
            else:
                x_BxTxD, _ = block(x_BxTxD, segment_ids=segment_ids, positions=positions)
        return x_BxTxD

    def _shared_kv_stack(self, x_BxCxD, segment_ids, positions, index_BxC, first_kv):
        """kv_cache=shared: the shared stack with each attention reading the first step's keys and
        values (of every token, masked causally by position index). At step 0 (first_kv None) they
        are computed here and returned."""
        made = []
        for j, block in enumerate(self.shared):
            h_BxCxD = block.mixer_norm(x_BxCxD)
            if first_kv is None:
                kv = _keys_values(block.mixer, h_BxCxD, positions) + (index_BxC, segment_ids)
                made.append(kv)
            else:
                kv = first_kv[j]
            x_BxCxD = x_BxCxD + _attend_to(block.mixer, h_BxCxD, positions, index_BxC, segment_ids, *kv)
            x_BxCxD = x_BxCxD + block.ffn(block.ffn_norm(x_BxCxD))
        return x_BxCxD, (made if first_kv is None else first_kv)

    # ---- the parallel forward -----------------------------------------------------------------------

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None):
        if cache is not None:
            return self._decode(x_BxTxD, positions, cache)
        if seq_size() > 1:
            raise ValueError("model.recursion (Mixture-of-Recursions) reorders each row's tokens and needs whole rows "
                             "on a device: use a mesh without seq > 1")
        rc = self.recursion
        B, T, _ = x_BxTxD.shape
        training = not self.deterministic
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BxTxD = self._run(self.first, x_BxTxD, segment_ids, positions)
        slots = rc.slots(T)
        active_BxT = jnp.ones((B, T), bool)
        if rc.routing == "token_choice":
            depth_BxT, depth_gate_BxT, probs_BxTxN = self._depths(x_BxTxD)
        first_kv, shares = None, []
        for r in range(rc.num_recursions):
            gate_BxT = None
            if rc.routing == "expert_choice" and self.routed(r):
                logit_BxT = self._logit(x_BxTxD, r)
                if training:
                    wanted_BxT = top_k_mask(jnp.where(active_BxT, logit_BxT, -jnp.inf), slots[r])
                    self._report_choice(r, logit_BxT, wanted_BxT, active_BxT)
                else:
                    wanted_BxT = active_BxT & (logit_BxT > 0)
                gate_BxT = jax.nn.sigmoid(logit_BxT)
                capacity = slots[r] if training else T
            elif rc.routing == "token_choice" and self.routed(r):
                wanted_BxT, gate_BxT, capacity = active_BxT & (depth_BxT >= r), depth_gate_BxT, slots[r]
            else:
                wanted_BxT, capacity = active_BxT, slots[r] if rc.routing == "token_choice" else T
            index_BxC, kept_BxC = compact(wanted_BxT, capacity)
            x_BxCxD = gather_rows(x_BxTxD, index_BxC)
            segments_BxC = None if segment_ids is None else gather_rows(segment_ids, index_BxC)
            positions_BxC = gather_rows(positions, index_BxC)
            if rc.kv_cache == "shared":
                y_BxCxD, first_kv = self._shared_kv_stack(x_BxCxD, segments_BxC, positions_BxC, index_BxC, first_kv)
            else:
                y_BxCxD = self._run(self.shared, x_BxCxD, segments_BxC, positions_BxC)
            update_BxCxD = (y_BxCxD - x_BxCxD).astype(jnp.float32)
            if gate_BxT is not None:
                update_BxCxD = update_BxCxD * gather_rows(gate_BxT, index_BxC)[..., None]
            update_BxCxD = jnp.where(kept_BxC[..., None], update_BxCxD, 0.0)
            x_BxTxD = scatter_add_rows(x_BxTxD, index_BxC, update_BxCxD)
            active_BxT = jnp.zeros((B, T), bool).at[jnp.arange(B)[:, None], index_BxC].set(kept_BxC)
            shares.append(jnp.mean(active_BxT.astype(jnp.float32)))
        if training:
            report_metric(self, "depth_share", jnp.stack(shares))
            if rc.routing == "token_choice":
                self._report_depths(depth_BxT, probs_BxTxN)
        return self._run(self.last, x_BxTxD, segment_ids, positions)

    def _report_choice(self, r: int, logit_BxT, chosen_BxT, active_BxT) -> None:
        """expert_choice, training: the auxiliary BCE loss and the inference-time mismatch at step r."""
        bce, mismatch = expert_choice_loss(logit_BxT, chosen_BxT, active_BxT)
        if self.recursion.router_aux_loss_weight:
            report_loss(self, f"router_bce_{r}", self.recursion.router_aux_loss_weight * bce)
        report_metric(self, f"mismatch_{r}", mismatch)

    def _report_depths(self, depth_BxT, probs_BxTxN) -> None:
        """token_choice, training: the switch loss over the depths and the router's assigned shares."""
        rc = self.recursion
        n = rc.num_recursions
        counts_N = jnp.zeros((n,), jnp.float32).at[depth_BxT.reshape(-1)].add(1.0)
        f_N = jax.lax.stop_gradient(counts_N / jnp.sum(counts_N))
        if rc.balance_loss_weight:
            mean_probs_N = jnp.mean(probs_BxTxN.reshape(-1, n), axis=0)
            report_loss(self, "depth_balance_loss", rc.balance_loss_weight * n * jnp.sum(f_N * mean_probs_N))
        report_metric(self, "assigned_share", f_N)

    # ---- decoding ---------------------------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int) -> dict:
        """Per row: the unique blocks' caches, one cache per step for each shared block (shared
        kv: the first step's only), each step's count of taken tokens and the next position."""
        rc = self.recursion
        slots = rc.slots(max_len) if rc.routing == "token_choice" else [max_len] * rc.num_recursions
        steps = 1 if rc.kv_cache == "shared" else rc.num_recursions
        row = {"first": [b.init_cache(1, max_len) for b in self.first],
               "steps": [[b.init_cache(1, slots[r]) for b in self.shared] for r in range(steps)],
               "last": [b.init_cache(1, max_len) for b in self.last],
               "counts": jnp.zeros((rc.num_recursions,), jnp.int32), "position": jnp.zeros((), jnp.int32),
               "slots": jnp.asarray(slots, jnp.int32)}
        return jax.tree.map(lambda a: jnp.broadcast_to(a[None], (batch,) + a.shape), row)

    def _decode(self, x_BxTxD, positions, cache):
        B, T, _ = x_BxTxD.shape
        if positions is None:
            positions = cache["position"][:, None] + jnp.arange(T, dtype=jnp.int32)
        rows = jax.vmap(lambda c, x, p: jax.lax.scan(self._decode_token, c, (x, p)))
        cache, y_BxTxD = rows(cache, x_BxTxD, positions)
        return y_BxTxD, cache

    def _decode_token(self, cache, token):
        """One token of one row through every step that takes it; (cache, y [D])."""
        rc = self.recursion
        x_D, position = token
        x, pos = x_D[None, None], position[None, None]
        cache = dict(cache)
        cache["first"], x = _blocks_cached(self.first, x, pos, cache["first"])
        active = jnp.bool_(True)
        if rc.routing == "token_choice":
            depth, depth_gate, _ = self._depths(x)
            depth, depth_gate = depth[0, 0], depth_gate[0, 0]
        steps, counts = list(cache["steps"]), cache["counts"]
        for r in range(rc.num_recursions):
            gate = None
            if rc.routing == "expert_choice" and self.routed(r):
                logit = self._logit(x, r)[0, 0]
                wanted, gate = active & (logit > 0), jax.nn.sigmoid(logit)
            elif rc.routing == "token_choice":
                wanted = active & (counts[r] < cache["slots"][r])
                if self.routed(r):
                    wanted, gate = wanted & (depth >= r), depth_gate
            else:
                wanted = active
            s = 0 if rc.kv_cache == "shared" else r

            def take(args, r=r, s=s, gate=gate):
                x, step_caches = args
                if rc.kv_cache == "shared" and r > 0:
                    y = x
                    for j, block in enumerate(self.shared):
                        h = block.mixer_norm(y)
                        kv = step_caches[j]
                        visible = jnp.arange(kv["k"].shape[1]) < kv["end"]
                        y = y + _attend_to_cache(block.mixer, h, pos, kv["k"], kv["v"], visible)
                        y = y + block.ffn(block.ffn_norm(y))
                    new = step_caches
                else:
                    new, y = _blocks_cached(self.shared, x, pos, step_caches)
                update = (y - x).astype(jnp.float32) * (1.0 if gate is None else gate)
                return (x + update).astype(x.dtype), new

            x, steps[s] = jax.lax.cond(wanted, take, lambda args: args, (x, steps[s]))
            counts = counts.at[r].add(wanted.astype(jnp.int32))
            active = wanted
        cache["steps"], cache["counts"] = steps, counts
        cache["last"], x = _blocks_cached(self.last, x, pos, cache["last"])
        cache["position"] = cache["position"] + 1
        return cache, x[0, 0]


def _blocks_cached(blocks, x, positions, caches):
    new = []
    for block, cache in zip(blocks, caches):
        x, c = block(x, positions=positions, cache=cache)
        new.append(c)
    return new, x


def _keys_values(attention: Attention, h_BxTxD, positions_BxT):
    c = attention.config
    k = apply_rotary(project("btd,dhk->bthk", h_BxTxD, attention.w_k, c.dtype), positions_BxT, c.rope_theta)
    return k, project("btd,dhk->bthk", h_BxTxD, attention.w_v, c.dtype)


def _query(attention: Attention, h_BxTxD, positions_BxT):
    c = attention.config
    return apply_rotary(project("btd,dhk->bthk", h_BxTxD, attention.w_q, c.dtype), positions_BxT, c.rope_theta)


def _attend_to(attention: Attention, h_BxCxD, positions_BxC, index_BxC, segments_BxC, k_BxSxGxK, v_BxSxGxK,
               key_index_BxS, key_segments_BxS):
    """Attention from the C chosen tokens to the given keys and values: key s is visible to query t
    when its position index is not later and (with segments) it is in t's segment."""
    visible_BxCxS = key_index_BxS[:, None, :] <= index_BxC[:, :, None]
    if segments_BxC is not None:
        visible_BxCxS = visible_BxCxS & (key_segments_BxS[:, None, :] == segments_BxC[:, :, None])
    o = dot_product_attention(_query(attention, h_BxCxD, positions_BxC), k_BxSxGxK, v_BxSxGxK, causal=False,
                              mask=visible_BxCxS, implementation=attention.config.implementation)
    return project("bthk,hkd->btd", o, attention.w_o, attention.config.dtype)


def _attend_to_cache(attention: Attention, h_1x1xD, position_1x1, k_1xSxGxK, v_1xSxGxK, visible_S):
    o = dot_product_attention(_query(attention, h_1x1xD, position_1x1), k_1xSxGxK, v_1xSxGxK, causal=False,
                              mask=visible_S[None, :], implementation=attention.config.implementation)
    return project("bthk,hkd->btd", o, attention.w_o, attention.config.dtype)


def stored_kv_bytes(cache) -> int:
    """Bytes of keys and values the filled attention caches of a Mixture-of-Recursions cache hold:
    for each (rows, layer) cache, its filled rows `end` times the bytes of one row of k and of v."""
    total = 0
    for layer in [*cache["first"], *[c for step in cache["steps"] for c in step], *cache["last"]]:
        if isinstance(layer, dict) and {"k", "v", "end"} <= set(layer):
            row_bytes = sum(int(np.prod(layer[n].shape[3:])) * layer[n].dtype.itemsize for n in ("k", "v"))
            total += int(np.sum(np.asarray(layer["end"]))) * row_bytes
    return total
