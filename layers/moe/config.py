"""Shape and routing knobs of the mixture-of-experts FFN, with its parameter and FLOP counts."""

import math
from typing import ClassVar

from pydantic import model_validator

from hybrax.layers.config import DType, Implementation, LayerConfig, ModelShape

SCORES = ("softmax", "sigmoid")
DISPATCHES = ("dropless", "capacity")
BALANCE_SCOPES = ("sequence", "micro", "global")
EXCHANGES = ("padded", "ragged")


class MoEConfig(LayerConfig):
    """E SwiGLU experts of width F, top_k routed per token, plus S always-on shared experts.

    Parameters: router D E + routed experts 3 D F E + shared experts 3 D F S. Active per token:
    router + (top_k + S) experts."""

    kernel: ClassVar[str] = "grouped_matmul"
    tiny: ClassVar[dict] = {"num_experts": 4, "expert_hidden": 16, "dispatch": "capacity", "capacity_factor": 4.0}

    d_model: int = 256
    num_experts: int = 8
    top_k: int = 2
    # F, the width of each expert (fine-grained experts: small F, large E); None: the dense FFN's
    # active width, mlp_hidden / (top_k + num_shared_experts) rounded down to a multiple of 8
    expert_hidden: int | None = None
    num_shared_experts: int = 0              # S
    score: str = "softmax"                   # router scores: softmax over experts, or per-expert sigmoid
    renormalize: bool = True                 # divide the top_k weights by their sum
    dispatch: str = "dropless"               # dropless (sorted grouped matmul) | capacity (einsum, drops overflow)
    capacity_factor: float = 1.25            # capacity mode: C = ceil(T * top_k / E * capacity_factor) per row
    balance_loss_weight: float = 0.01        # switch load-balancing loss E sum_i f_i p_i (0: off)
    balance_scope: str = "micro"             # sequence | micro | global: the tokens f_i and p_i are taken over
    z_loss_weight: float = 0.0               # router z-loss mean(logsumexp(logits)^2) (0: off)
    bias_update_rate: float = 0.0            # auxiliary-loss-free balancing: bias step per update (0: off)
    exchange: str = "padded"                 # expert parallelism: padded all_to_all | ragged_all_to_all (GPU/TPU)
    init_std: float = 0.02
    implementation: Implementation = None    # grouped_matmul implementation (unset: model.kernels)
    dtype: DType = "float32"
    param_dtype: DType = "float32"

    def derived(self, shape: ModelShape) -> dict:
        return {"expert_hidden": max(8, shape.mlp_hidden // (self.top_k + self.num_shared_experts) // 8 * 8)}

    @model_validator(mode="after")
    def _check(self):
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if (self.expert_hidden is not None and self.expert_hidden < 1) or self.num_shared_experts < 0:
            raise ValueError(f"expert_hidden={self.expert_hidden} must be >= 1 and "
                             f"num_shared_experts={self.num_shared_experts} >= 0")
        for key, valid in (("score", SCORES), ("dispatch", DISPATCHES), ("balance_scope", BALANCE_SCOPES),
                           ("exchange", EXCHANGES)):
            if getattr(self, key) not in valid:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {valid}")
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0")
        for key in ("balance_loss_weight", "z_loss_weight", "bias_update_rate"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 0")
        return self

    def capacity(self, tokens: int) -> int:
        """Slots per expert for a dispatch group of `tokens` tokens in capacity mode:
        C = ceil(tokens * top_k / E * capacity_factor) (at least 1)."""
        return max(1, math.ceil(tokens * self.top_k * self.capacity_factor / self.num_experts - 1e-9))

    def _expert_params(self) -> int:
        return 3 * self.d_model * self.expert_hidden

    def num_params(self) -> int:
        """All parameters: router, every routed expert and the shared experts."""
        return self.d_model * self.num_experts + self._expert_params() * (self.num_experts + self.num_shared_experts)

    def num_active_params(self) -> int:
        """Parameters one token uses: router, its top_k experts and the shared experts."""
        return self.d_model * self.num_experts + self._expert_params() * (self.top_k + self.num_shared_experts)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward matmul FLOPs per token (2 per multiply-add) of the router and the active experts
        only; the sort, gather and combine (or capacity mode's dispatch einsums) are not counted."""
        del seq_len
        return 2 * self.num_active_params()
