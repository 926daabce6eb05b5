"""The mLSTM layer of xLSTM 7B (Beck et al., 2025, "xLSTM 7B: A Recurrent LLM for Fast and Efficient
Inference"; the cell from Beck et al., 2024, "xLSTM: Extended Long Short-Term Memory").

    q, k = x W_q, x W_k                      [B, T, H, K]   (K = head_dim / 2: xLSTM 7B's d_qk = d_v / 2)
    v    = x W_v                             [B, T, H, V]   (V = head_dim)
    li   = cap(x W_i + b_i),  lf = log_sigmoid(cap(x W_f + b_f))      [B, T, H]   cap(z) = c tanh(z / c), c = 15
    o    = sigmoid(x W_o)                    [B, T, H, V]   (the output gate)
    m_t  = max(lf_t + m_{t-1}, li_t)
    C_t  = exp(lf_t + m_{t-1} - m_t) C_{t-1} + exp(li_t - m_t) k_t^T v_t        C [B, H, K, V] float32
    n_t  = exp(lf_t + m_{t-1} - m_t) n_{t-1} + exp(li_t - m_t) k_t              n [B, H, K]
    h_t  = K^-1/2 q_t C_t / max(|K^-1/2 q_t n_t|, exp(-m_t))
    y    = (RMSNorm_head(h) * o) W_out       [B, T, d_model]

The exponential input gate and the max-stabiliser m are xLSTM's; xLSTM 7B soft-caps the gate
pre-activations at 15, starts the input gate at -10 (its bias) and the forget gate between 3 and 6
(sigmoid ~0.95..0.998 per token, so heads range from short to long memory), and normalises each
head's output before the output gate. The block around it (pre-norm, residual, the SwiGLU FFN)
is CausalLM's `Block`.

The cell is its own op (`pallas_kernels.mlstm`), not an option of `linear_attention`: the output is
a ratio of two linear reads of the state with a data-dependent floor, and the stabiliser makes the
state a triple (C, n, m) combined by a max, which a linear state-passing kernel does not carry.
Under a mesh that splits `seq` the layer runs `mlstm_sequence_parallel` (one all-gather of every
chunk's final state per layer); decoding carries (C, n, m).

Parameter budget (d = d_model, H K = d/2, H V = d by default): W_q, W_k d^2 / 2 each, W_v, W_o,
W_out d^2 each, the gates 2 (d H + H), the norm H V: 4 d^2 + 2 H (d + 1) + d.
"""

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from hybrax.layers.config import DType, Implementation, LayerConfig, ModelShape
from hybrax.layers.linear.group_norm import HeadRMSNorm
from hybrax.layers.linear.linear_recurrence import check_decoding
from hybrax.layers.linear.mlstm_parallel import mlstm_sequence_parallel
from hybrax.layers.parameters import constant, linspace, logical_param, normal
from hybrax.layers.partitioned import mlstm
from hybrax.layers.projection import project
from hybrax.layers.sequence_parallel.layout import seq_size


class MLSTMConfig(LayerConfig):
    kernel: ClassVar[str] = "mlstm"
    tiny: ClassVar[dict] = {"chunk_size": 5}   # the conformance suite's 13 tokens cross chunks

    d_model: int = 256
    num_heads: int = 4                  # heads (unset: model.num_heads)
    key_dim: int | None = None          # query/key width per head (None: half the model's head_dim)
    value_dim: int | None = None        # value width per head (None: the model's head_dim)
    gate_soft_cap: float = 15.0         # gate pre-activations z -> cap tanh(z / cap) (xLSTM 7B: 15)
    input_gate_bias: float = -10.0      # initial input-gate bias (xLSTM 7B: -10)
    forget_gate_bias_min: float = 3.0   # initial forget-gate biases, linspace(min, max) over the heads
    forget_gate_bias_max: float = 6.0
    chunk_size: int = 64                # tokens per chunk of the chunked recurrence
    norm_eps: float = 1e-6              # epsilon of the per-head output RMSNorm
    init_std: float = 0.02
    implementation: Implementation = None   # mlstm implementation (unset: model.kernels.mlstm)
    dtype: DType = "float32"
    param_dtype: DType = "float32"

    def derived(self, shape: ModelShape) -> dict:
        return {"key_dim": max(1, shape.head_dim // 2), "value_dim": shape.head_dim}

    def num_params(self) -> int:
        d, H, HK, HV = self.d_model, self.num_heads, self.num_heads * self.key_dim, self.num_heads * self.value_dim
        return 2 * d * HK + 3 * d * HV + 2 * (d * H + H) + HV

    def state_bytes_per_sequence(self) -> int:
        """The matrix memory C [H, K, V], normalizer n [H, K] and stabilizer m [H], float32."""
        H, K, V = self.num_heads, self.key_dim, self.value_dim
        return (H * K * V + H * K + H) * 4

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: the projections and the chunked cell (per head: intra-chunk
        scores C K and their product with v and with ones, C (V + 1); the inter-chunk reads of C
        and n, K (V + 1); the state update K (V + 1)); elementwise work is not counted."""
        d, H, K, V = self.d_model, self.num_heads, self.key_dim, self.value_dim
        C = min(self.chunk_size, seq_len)
        projections = 2 * (2 * d * H * K + 3 * d * H * V + 2 * d * H)
        return projections + H * 2 * (C * K + C * (V + 1) + 2 * K * (V + 1))


def mlstm_step(q_BxHxK, k_BxHxK, v_BxHxV, li_BxH, lf_BxH, state, scale: float):
    """One step of the stabilised cell (decoding), written from the formulas, independently of the
    op; returns (h `[B, H, V]` float32, new state)."""
    f32 = jnp.float32
    c, n, m = (s.astype(f32) for s in state)
    q, k, v = q_BxHxK.astype(f32) * scale, k_BxHxK.astype(f32), v_BxHxV.astype(f32)
    m_new = jnp.maximum(lf_BxH + m, li_BxH)
    forget, write = jnp.exp(lf_BxH + m - m_new), jnp.exp(li_BxH - m_new)
    c = forget[..., None, None] * c + write[..., None, None] * k[..., :, None] * v[..., None, :]
    n = forget[..., None] * n + write[..., None] * k
    numerator = jnp.einsum("bhk,bhkv->bhv", q, c)
    denominator = jnp.maximum(jnp.abs(jnp.sum(q * n, axis=-1)), jnp.exp(-m_new))
    return numerator / denominator[..., None], (c, n, m_new)


class MLSTM(nnx.Module):
    def __init__(self, config: MLSTMConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        init = normal(c.init_std)
        H, K, V, d = c.num_heads, c.key_dim, c.value_dim, c.d_model
        head_axes = ("embed", "heads", "head_dim")
        self.w_q = logical_param(rngs, init, (d, H, K), c.param_dtype, head_axes)
        self.w_k = logical_param(rngs, init, (d, H, K), c.param_dtype, head_axes)
        self.w_v = logical_param(rngs, init, (d, H, V), c.param_dtype, head_axes)
        self.w_o = logical_param(rngs, init, (d, H, V), c.param_dtype, head_axes)
        self.w_input_gate = logical_param(rngs, init, (d, H), c.param_dtype, ("embed", "heads"))
        self.input_gate_bias = logical_param(rngs, constant(c.input_gate_bias), (H,), c.param_dtype, ("heads",))
        self.w_forget_gate = logical_param(rngs, init, (d, H), c.param_dtype, ("embed", "heads"))
        self.forget_gate_bias = logical_param(rngs, linspace(c.forget_gate_bias_min, c.forget_gate_bias_max),
                                              (H,), c.param_dtype, ("heads",))
        self.norm = HeadRMSNorm(H, V, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.w_out = logical_param(rngs, init, (H, V, d), c.param_dtype, ("heads", "head_dim", "embed"))

    def init_cache(self, batch: int, max_len: int) -> dict:
        """The cell state (C `[B, H, K, V]`, n `[B, H, K]`, m `[B, H]`) float32; independent of `max_len`."""
        del max_len
        c = self.config
        H, K, V = c.num_heads, c.key_dim, c.value_dim
        return {"c": jnp.zeros((batch, H, K, V), jnp.float32), "n": jnp.zeros((batch, H, K), jnp.float32),
                "m": jnp.zeros((batch, H), jnp.float32)}

    def _gate(self, x_BxTxD, weight, bias):
        c = self.config
        z = project("btd,dh->bth", x_BxTxD, weight, c.dtype).astype(jnp.float32) + bias[...].astype(jnp.float32)
        return c.gate_soft_cap * jnp.tanh(z / c.gate_soft_cap)

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None):
        del positions  # the gates carry the order; no position embedding
        c = self.config
        check_decoding(segment_ids, cache)
        q_BxTxHxK = project("btd,dhk->bthk", x_BxTxD, self.w_q, c.dtype)
        k_BxTxHxK = project("btd,dhk->bthk", x_BxTxD, self.w_k, c.dtype)
        v_BxTxHxV = project("btd,dhv->bthv", x_BxTxD, self.w_v, c.dtype)
        o_BxTxHxV = project("btd,dhv->bthv", x_BxTxD, self.w_o, c.dtype)
        # the log-gates stay float32: they are summed over the chunk inside the op
        li_BxTxH = self._gate(x_BxTxD, self.w_input_gate, self.input_gate_bias)
        lf_BxTxH = jax.nn.log_sigmoid(self._gate(x_BxTxD, self.w_forget_gate, self.forget_gate_bias))
        scale = c.key_dim ** -0.5
        options = {"scale": scale, "chunk_size": c.chunk_size, "implementation": c.implementation}
        new_cache = None
        if cache is None and seq_size() > 1:
            h_BxTxHxV = mlstm_sequence_parallel(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, li_BxTxH, lf_BxTxH,
                                                segment_ids=segment_ids, **options)
        elif cache is None:
            h_BxTxHxV, _ = mlstm(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, li_BxTxH, lf_BxTxH, segment_ids=segment_ids,
                                 **options)
        elif x_BxTxD.shape[1] == 1:
            h_BxHxV, state = mlstm_step(q_BxTxHxK[:, 0], k_BxTxHxK[:, 0], v_BxTxHxV[:, 0], li_BxTxH[:, 0],
                                        lf_BxTxH[:, 0], (cache["c"], cache["n"], cache["m"]), scale)
            h_BxTxHxV, new_cache = h_BxHxV[:, None].astype(v_BxTxHxV.dtype), dict(zip("cnm", state))
        else:  # a prefill: the chunked op from the cached state
            h_BxTxHxV, state = mlstm(q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, li_BxTxH, lf_BxTxH,
                                     initial_state=(cache["c"], cache["n"], cache["m"]), return_final_state=True,
                                     **options)
            new_cache = dict(zip("cnm", state))
        gated_BxTxHxV = self.norm(h_BxTxHxV) * jax.nn.sigmoid(o_BxTxHxV.astype(jnp.float32)).astype(c.dtype)
        y_BxTxD = project("bthv,hvd->btd", gated_BxTxHxV, self.w_out, c.dtype)
        return y_BxTxD if cache is None else (y_BxTxD, new_cache)
