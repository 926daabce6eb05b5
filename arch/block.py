"""One pre-norm block: x + mixer(norm(x)), then + ffn(norm(x)); the mixer and FFN by registered name.

Most FFNs are `ffn(x)`. Two kinds get more:
- `takes_modalities` (MoMa): each token's modality id, `ffn(x, modality_ids=...)`.
- an FFN with `init_cache` (a stateful FFN, e.g. `uoe_mlp` in patch selection, whose routing reads
  earlier tokens of the document): called like a mixer, `ffn(x, segment_ids=, positions=, cache=)`;
  the block's cache is then the pair (mixer cache, FFN cache)."""

from flax import nnx

from hybrax.arch.config import ModelConfig
from hybrax.arch.registry import FFNS, MIXERS
from hybrax.layers.norms import RMSNorm


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, mixer: str, ffn: str, *, rngs: nnx.Rngs):
        kw = dict(eps=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.mixer_norm = RMSNorm(config.d_model, **kw)
        self.mixer = MIXERS.build(mixer, config, rngs=rngs)
        self.ffn_norm = RMSNorm(config.d_model, **kw)
        self.ffn = FFNS.build(ffn, config, rngs=rngs)

    @property
    def stateful_ffn(self) -> bool:
        return hasattr(self.ffn, "init_cache")

    def init_cache(self, batch: int, max_len: int):
        mixer = self.mixer.init_cache(batch, max_len)
        return (mixer, self.ffn.init_cache(batch, max_len)) if self.stateful_ffn else mixer

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None, modality_ids=None):
        mixer_cache, ffn_cache = cache if (cache is not None and self.stateful_ffn) else (cache, None)
        mixed = self.mixer(self.mixer_norm(x_BxTxD), segment_ids=segment_ids, positions=positions, cache=mixer_cache)
        if cache is not None:
            mixed, mixer_cache = mixed
        x_BxTxD = x_BxTxD + mixed
        h_BxTxD = self.ffn_norm(x_BxTxD)
        if self.stateful_ffn:
            out = self.ffn(h_BxTxD, segment_ids=segment_ids, positions=positions, cache=ffn_cache)
            if cache is not None:
                out, ffn_cache = out
        elif getattr(self.ffn, "takes_modalities", False):   # MoMa: experts grouped by modality
            out = self.ffn(h_BxTxD, modality_ids=modality_ids)
        else:
            out = self.ffn(h_BxTxD)
        new_cache = None if cache is None else ((mixer_cache, ffn_cache) if self.stateful_ffn else mixer_cache)
        return x_BxTxD + out, new_cache
