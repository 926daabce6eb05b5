"""One pre-norm block: x + mixer(norm(x)), then + ffn(norm(x)); the mixer and FFN by registered name.
An FFN with `takes_modalities` (MoMa) also gets each token's modality id."""

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

    def __call__(self, x_BxTxD, *, segment_ids=None, positions=None, cache=None, modality_ids=None):
        mixed = self.mixer(self.mixer_norm(x_BxTxD), segment_ids=segment_ids, positions=positions, cache=cache)
        new_cache = None
        if cache is not None:
            mixed, new_cache = mixed
        x_BxTxD = x_BxTxD + mixed
        h_BxTxD = self.ffn_norm(x_BxTxD)
        if getattr(self.ffn, "takes_modalities", False):   # MoMa: experts grouped by modality
            x_BxTxD = x_BxTxD + self.ffn(h_BxTxD, modality_ids=modality_ids)
        else:
            x_BxTxD = x_BxTxD + self.ffn(h_BxTxD)
        return x_BxTxD, new_cache
