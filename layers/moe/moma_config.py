"""Settings of MoMa, the modality-aware mixture of experts (layers/moe/moma.py), with its counts."""

import math
from typing import ClassVar

from pydantic import model_validator

from hybrax.layers.moe.config import MoEConfig

MOMA_ROUTING = ("expert_choice", "token_choice")


class MoMaConfig(MoEConfig):
    """MoE experts split into one group per modality; a token is routed only among its group.

    `experts_per_modality` fixes the groups (modality m owns the next experts_per_modality[m]
    experts) and `num_experts` is their sum. `routing`: `expert_choice` (as in the paper: each
    expert takes the C = ceil(T capacity_factor / E) tokens of its modality with the highest
    affinity in the row, gated by it; `capacity_factor` is then the experts per token on average)
    or `token_choice` (the MoE layer's top_k routing and dispatch, restricted to the group).
    Expert choice reads the whole row, so its training is not causal: an auxiliary BCE
    (`router_aux_loss_weight`) teaches each expert's logit > 0 to predict its choice, and
    evaluation and decoding route by that (every expert of the group whose logit is > 0)."""

    tiny: ClassVar[dict] = {"experts_per_modality": [2, 2], "expert_hidden": 16, "capacity_factor": 2.0}

    experts_per_modality: list[int] = [4, 4]
    num_experts: int = 8                     # the sum of experts_per_modality (follows it when unset)
    routing: str = "expert_choice"
    capacity_factor: float = 2.0             # expert_choice: experts per token on average
    top_k: int = 1                           # token_choice: experts per token, within its group
    router_aux_loss_weight: float = 0.01     # expert_choice: BCE(logit, chosen) for causal inference

    @model_validator(mode="before")
    @classmethod
    def _num_experts(cls, data):
        if isinstance(data, dict):
            groups = data.get("experts_per_modality", cls.model_fields["experts_per_modality"].default)
            total = sum(groups) if isinstance(groups, list) and all(isinstance(g, int) for g in groups) else None
            if data.get("num_experts") not in (None, total) and total is not None:
                raise ValueError(f"num_experts={data['num_experts']} must equal the sum of experts_per_modality="
                                 f"{groups}; leave it unset")
            data = {**data, "num_experts": total}
        return data

    @model_validator(mode="after")
    def _check_groups(self):
        if not self.experts_per_modality or any(g < 1 for g in self.experts_per_modality):
            raise ValueError(f"experts_per_modality={self.experts_per_modality} needs one or more groups of >= 1 "
                             f"experts")
        if self.routing not in MOMA_ROUTING:
            raise ValueError(f"routing={self.routing!r} is not one of {MOMA_ROUTING}")
        if self.routing == "token_choice" and self.top_k > min(self.experts_per_modality):
            raise ValueError(f"top_k={self.top_k} exceeds the smallest modality group "
                             f"({min(self.experts_per_modality)} experts of {self.experts_per_modality})")
        return self

    @property
    def num_modalities(self) -> int:
        return len(self.experts_per_modality)

    def expert_slots(self, tokens: int) -> int:
        """expert_choice: tokens each expert takes from a row of `tokens`, ceil(T c / E)."""
        return max(1, math.ceil(tokens * self.capacity_factor / self.num_experts - 1e-9))

    def num_active_params(self) -> int:
        if self.routing == "token_choice":
            return super().num_active_params()
        routed = self._expert_params() * self.capacity_factor
        return round(self.d_model * self.num_experts + routed + self._expert_params() * self.num_shared_experts)

    def flops_per_token(self, seq_len: int) -> int:
        """Token choice: the MoE layer's count. Expert choice: the router, the E C slots of a row
        per token (fixed shapes: empty slots are computed too) and the one-hot gather and combine
        einsums that fill and empty them (2 E C D each, per token)."""
        if self.routing == "token_choice":
            return super().flops_per_token(seq_len)
        slots = self.num_experts * self.expert_slots(seq_len) / seq_len       # expert rows per token
        expert = 2 * self._expert_params()
        shared = 2 * self._expert_params() * self.num_shared_experts
        gather_combine = 2 * 2 * self.num_experts * self.expert_slots(seq_len) * self.d_model
        return round(2 * self.d_model * self.num_experts + slots * expert + shared + gather_combine)
