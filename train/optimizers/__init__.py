"""Memory-efficient optimizers, each an optax GradientTransformation chosen by `optim.name`
(train/optim.py): `adamw8bit.py` (with `block_quantization.py`), `galore.py` (GaLore and Natural
GaLore, with `subspace.py`), `frugal.py`; `parameters.py` holds what they share."""
