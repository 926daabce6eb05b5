"""Gated feed-forward block, SwiGLU (Shazeer, 2020): y = W_down(silu(x W_gate) * (x W_up))."""

import jax
import jax.numpy as jnp
from flax import nnx

from hybrax.layers.config import DType, LayerConfig, ModelShape
from hybrax.layers.parameters import logical_param, normal
from hybrax.layers.projection import project


class MLPConfig(LayerConfig):
    """SwiGLU shape. Parameter budget: 3 * d_model * hidden."""

    d_model: int = 256
    hidden: int | None = None           # (None: model.mlp_hidden, 8/3 d_model rounded up to 64)
    init_std: float = 0.02
    dtype: DType = "float32"
    param_dtype: DType = "float32"

    def derived(self, shape: ModelShape) -> dict:
        return {"hidden": shape.mlp_hidden}

    def num_params(self) -> int:
        return 3 * self.d_model * self.hidden

    def flops_per_token(self, seq_len: int) -> int:
        """Forward matmul FLOPs per token (2 per multiply-add); independent of seq_len."""
        del seq_len
        return 2 * self.num_params()


class SwiGLU(nnx.Module):
    def __init__(self, config: MLPConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        init = normal(c.init_std)
        self.w_gate = logical_param(rngs, init, (c.d_model, c.hidden), c.param_dtype, ("embed", "mlp"))
        self.w_up = logical_param(rngs, init, (c.d_model, c.hidden), c.param_dtype, ("embed", "mlp"))
        self.w_down = logical_param(rngs, init, (c.hidden, c.d_model), c.param_dtype, ("mlp", "embed"))

    def __call__(self, x_BxTxD: jnp.ndarray) -> jnp.ndarray:
        dtype = self.config.dtype
        gate_BxTxF = project("btd,df->btf", x_BxTxD, self.w_gate, dtype)
        up_BxTxF = project("btd,df->btf", x_BxTxD, self.w_up, dtype)
        return project("btf,fd->btd", jax.nn.silu(gate_BxTxF) * up_BxTxF, self.w_down, dtype)
