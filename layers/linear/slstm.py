"""The sLSTM layer of xLSTM (Beck et al., 2024, "xLSTM: Extended Long Short-Term Memory"): scalar
memory with recurrent weights, exponential gating, a normaliser and a stabiliser, heads with
block-diagonal recurrent weights (FlashRNN, Pöppel et al., 2024).

    x_c  = silu(conv(x))                                  [B, T, d]   (causal, depthwise, width 4)
    (i~, f~) = x_c,h W_if,h,   (z~, o~) = x_h W_zo,h      per head h: x split into H blocks of d / H
    pre_t = (i~, f~, z~, o~)_t + b + h_{t-1} R            R [H, D, 4, D] block-diagonal
    m_t = max(log sigmoid(f~) + m_{t-1}, i~),  i' = exp(i~ - m_t),  f' = exp(log sigmoid(f~) + m_{t-1} - m_t)
    c_t = f' c_{t-1} + i' tanh(z~),  n_t = f' n_{t-1} + i',  h_t = sigmoid(o~) c_t / n_t       [B, T, H, D]
    y   = RMSNorm_head(h) W_out                           [B, T, d_model]

The input and forget gates read the convolved input and the cell and output gates the input
itself, with head-wise input projections, as in the xLSTM sLSTM block, except that the input gate
has no bias: a constant added to every i~ scales the numerator c and the normaliser n alike, so h
does not depend on it (its gradient is exactly zero). The block's gated MLP is
CausalLM's FFN after this mixer, and W_out maps the heads back to the residual width. Forget-gate
biases start between 3 and 6 over the heads. The recurrence is the op `pallas_kernels.slstm`
(strictly sequential in time). Under a mesh that splits `seq`, the convolution takes its halo
from the preceding chunk's device and the recurrence runs head-parallel
(layers/linear/slstm_parallel.py: all_to_all from time-split to head-split and back), since a
non-linear recurrence cannot be passed between devices as LASP does. Decoding carries
(c, n, m, h) and the last W - 1 inputs of the convolution.

Parameter budget (d = d_model, H D = d by default, W = 4): convolution (W + 1) d, head-wise
input projections 4 d D, gate biases 3 H D, recurrent weights 4 H D^2, norm H D, W_out H D d:
(with D = d / H) d^2 (1 + 8 / H) + (W + 5) d.
"""

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from pydantic import model_validator

from hybrax.layers.config import DType, Implementation, LayerConfig, itemsize
from hybrax.layers.linear.group_norm import HeadRMSNorm
from hybrax.layers.linear.linear_recurrence import check_decoding
from hybrax.layers.linear.slstm_parallel import slstm_sequence_parallel
from hybrax.layers.parameters import linspace, logical_param, normal, uniform
from hybrax.layers.partitioned import slstm
from hybrax.layers.projection import project
from hybrax.layers.sequence_parallel.halo import short_causal_convs_sequence_parallel
from hybrax.layers.sequence_parallel.layout import seq_size
from hybrax.layers.short_conv import short_causal_conv


class SLSTMConfig(LayerConfig):
    kernel: ClassVar[str] = "slstm"

    d_model: int = 256
    num_heads: int = 4                  # heads (unset: model.num_heads); must divide d_model
    head_dim: int = 64                  # cell width per head D (unset: the model's head_dim)
    conv_width: int = 4                 # width of the causal convolution before the input and forget gates
    forget_gate_bias_min: float = 3.0   # initial forget-gate biases, linspace(min, max) over the heads
    forget_gate_bias_max: float = 6.0
    norm_eps: float = 1e-5              # epsilon of the per-head output RMSNorm
    init_std: float = 0.02
    implementation: Implementation = None   # slstm implementation (unset: model.kernels.slstm)
    dtype: DType = "float32"
    param_dtype: DType = "float32"

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"slstm num_heads={self.num_heads} must divide d_model={self.d_model} "
                             "(the head-wise input projections split the input into num_heads blocks)")
        return self

    def num_params(self) -> int:
        d, H, D, W = self.d_model, self.num_heads, self.head_dim, self.conv_width
        return (W + 1) * d + 4 * d * D + 3 * H * D + 4 * H * D * D + H * D + H * D * d

    def state_bytes_per_sequence(self) -> int:
        """The cell's c, n, m, h [H, D] (float32) and the convolution's last W - 1 inputs [d]."""
        return 4 * self.num_heads * self.head_dim * 4 + (self.conv_width - 1) * self.d_model * itemsize(self.dtype)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: the convolution, the head-wise input projections, the
        recurrent matmul (4 H D^2 multiply-adds per step) and W_out; elementwise work is not counted."""
        del seq_len
        d, H, D, W = self.d_model, self.num_heads, self.head_dim, self.conv_width
        return 2 * (W * d + 4 * d * D + 4 * H * D * D + H * D * d)


class SLSTM(nnx.Module):
    def __init__(self, config: SLSTMConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        init = normal(c.init_std)
        H, D, W, d = c.num_heads, c.head_dim, c.conv_width, c.d_model
        self.conv = logical_param(rngs, uniform(-W ** -0.5, W ** -0.5), (W, d), c.param_dtype, ("conv", "embed"))
        self.conv_bias = logical_param(rngs, uniform(-W ** -0.5, W ** -0.5), (d,), c.param_dtype, ("embed",))
        self.w_input_forget = logical_param(rngs, init, (H, d // H, 2, D), c.param_dtype,
                                            ("heads", None, None, "head_dim"))
        self.w_cell_output = logical_param(rngs, init, (H, d // H, 2, D), c.param_dtype,
                                           ("heads", None, None, "head_dim"))
        self.forget_bias = logical_param(rngs, linspace(c.forget_gate_bias_min, c.forget_gate_bias_max), (H, D),
                                         c.param_dtype, ("heads", "head_dim"))
        self.cell_output_bias = logical_param(rngs, jax.nn.initializers.zeros, (H, 2, D), c.param_dtype,
                                              ("heads", None, "head_dim"))
        self.recurrent = logical_param(rngs, init, (H, D, 4, D), c.param_dtype,
                                       ("heads", None, None, "head_dim"))
        self.norm = HeadRMSNorm(H, D, eps=c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.w_out = logical_param(rngs, init, (H, D, d), c.param_dtype, ("heads", "head_dim", "embed"))

    def init_cache(self, batch: int, max_len: int) -> dict:
        """The cell state (c, n, m, h), each `[B, H, D]` float32, and the last W - 1 conv inputs."""
        del max_len
        c = self.config
        cell = {name: jnp.zeros((batch, c.num_heads, c.head_dim), jnp.float32) for name in "cnmh"}
        return {**cell, "conv": jnp.zeros((batch, c.conv_width - 1, c.d_model), c.dtype)}

    def gate_inputs(self, x_BxTxD, x_conv_BxTxD):
        """The input projections of the four gates plus their biases, `[B, T, H, 4, D]` float32."""
        c = self.config
        B, T, d = x_BxTxD.shape
        H = c.num_heads
        heads = lambda x: x.reshape(B, T, H, d // H)  # noqa: E731
        input_forget = project("bthi,higd->bthgd", heads(x_conv_BxTxD), self.w_input_forget, c.dtype)
        cell_output = project("bthi,higd->bthgd", heads(x_BxTxD), self.w_cell_output, c.dtype)
        forget_bias = self.forget_bias[...][:, None]
        bias = jnp.concatenate([jnp.zeros_like(forget_bias), forget_bias, self.cell_output_bias[...]],
                               axis=1).astype(jnp.float32)  # [H, 4, D]: no input-gate bias (see the docstring)
        return jnp.concatenate([input_forget, cell_output], axis=3).astype(jnp.float32) + bias

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None):
        del positions  # the recurrence carries the order
        c = self.config
        check_decoding(segment_ids, cache)
        decoding = cache is not None
        bias = self.conv_bias[...]
        if not decoding and seq_size() > 1:
            (x_conv,) = short_causal_convs_sequence_parallel([(x_BxTxD, self.conv[...], bias, ("embed",))],
                                                             segment_ids=segment_ids)
            conv_tail = None
        else:
            x_conv, conv_tail = short_causal_conv(x_BxTxD, self.conv[...], bias, segment_ids=segment_ids,
                                                  state=cache["conv"] if decoding else None)
        gates_BxTxHx4xD = self.gate_inputs(x_BxTxD, jax.nn.silu(x_conv))
        recurrent = self.recurrent[...]
        new_cache = None
        if not decoding and seq_size() > 1:
            h_BxTxHxD = slstm_sequence_parallel(gates_BxTxHx4xD, recurrent, segment_ids=segment_ids,
                                                implementation=c.implementation)
        elif not decoding:
            h_BxTxHxD, _ = slstm(gates_BxTxHx4xD, recurrent, segment_ids=segment_ids, implementation=c.implementation)
        else:
            h_BxTxHxD, state = slstm(gates_BxTxHx4xD, recurrent, initial_state=tuple(cache[n] for n in "cnmh"),
                                     return_final_state=True, implementation=c.implementation)
            new_cache = {**dict(zip("cnmh", state)), "conv": conv_tail}
        y_BxTxD = project("bthd,hde->bte", self.norm(h_BxTxHxD), self.w_out, c.dtype)
        return y_BxTxD if not decoding else (y_BxTxD, new_cache)
