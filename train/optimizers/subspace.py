"""A low-rank subspace of a matrix's gradients (GaLore; FRUGAL's svd projection).

The subspace of an m x n gradient G is spanned by its top-r singular vectors on the smaller side:
P = U[:, :r] when m <= n (the low-rank gradient is P^T G, r x n), else Q = V[:, :r] (G Q, m x r).
Refreshed from the current gradient's SVD every `update_interval` steps. Arrays are stored in the
parameter's own axes (the projector as the projected side's axes plus the rank; the low-rank
gradient as the kept side's axes plus the rank), so they shard by the parameter's names: the rank
axis takes `embed`'s mesh axis (fsdp) when the array has no embed axis, so no device holds a full
projector or moment.
"""

import dataclasses

import jax.numpy as jnp

from hybrax.train.optimizers.parameters import MatrixView


@dataclasses.dataclass(frozen=True)
class Subspace:
    view: MatrixView
    rank: int

    @property
    def side(self) -> str:
        """The side that is projected: the smaller one."""
        return "rows" if self.view.m <= self.view.n else "columns"

    @property
    def projector_shape(self) -> tuple[int, ...]:
        v = self.view
        return v.lead + (v.rows if self.side == "rows" else v.columns) + (self.rank,)

    @property
    def projector_names(self) -> tuple:
        v = self.view
        side = v.side_names(self.side)
        return v.names[:v.batch] + side + (v.rank_name(*side),)

    @property
    def low_rank_shape(self) -> tuple[int, ...]:
        v = self.view
        return v.lead + ((self.rank,) + v.columns if self.side == "rows" else v.rows + (self.rank,))

    @property
    def low_rank_names(self) -> tuple:
        v = self.view
        kept = v.side_names("columns" if self.side == "rows" else "rows")
        rank = v.rank_name(*kept)
        return v.names[:v.batch] + ((rank,) + kept if self.side == "rows" else kept + (rank,))

    def _projector_matrix(self, projector):
        v = self.view
        return projector.reshape(v.lead + ((v.m if self.side == "rows" else v.n), self.rank))

    def fit(self, grad):
        """The projector spanning the top-`rank` singular vectors of `grad` (parameter-shaped)."""
        u, _, vt = jnp.linalg.svd(self.view.matrix(grad), full_matrices=False)
        basis = u[..., :self.rank] if self.side == "rows" else jnp.swapaxes(vt[..., :self.rank, :], -1, -2)
        return basis.reshape(self.projector_shape)

    def down(self, projector, grad):
        """Parameter-shaped grad -> the low-rank gradient (low_rank_shape)."""
        p, g = self._projector_matrix(projector), self.view.matrix(grad)
        low = jnp.einsum("...mr,...mn->...rn", p, g) if self.side == "rows" else jnp.einsum("...mn,...nr->...mr", g, p)
        return low.reshape(self.low_rank_shape)

    def up(self, projector, low_rank):
        """A low-rank array -> parameter-shaped, back in the full space."""
        v, p = self.view, self._projector_matrix(projector)
        if self.side == "rows":
            full = jnp.einsum("...mr,...rn->...mn", p, low_rank.reshape(v.lead + (self.rank, v.n)))
        else:
            full = jnp.einsum("...mr,...nr->...mn", low_rank.reshape(v.lead + (v.m, self.rank)), p)
        return v.unmatrix(full)
