"""Inside `shard_map` over `seq`: a device's rows [b, 2c, ...] are its two zigzag chunks (layout.py),
natural chunks d and 2P - 1 - d. Stacking them on the batch dim lets a per-chunk computation (the
chunked op, a convolution) run once over both."""

import jax


def stack(x: jax.Array) -> jax.Array:
    """[b, 2c, ...] -> [2 b, c, ...], chunk-major: rows 0..b-1 hold chunk d, rows b..2b-1 chunk 2P-1-d."""
    b, two_c = x.shape[:2]
    x = x.reshape(b, 2, two_c // 2, *x.shape[2:])
    return x.swapaxes(0, 1).reshape(2 * b, two_c // 2, *x.shape[3:])


def unstack(x: jax.Array) -> jax.Array:
    """[2 b, c, ...] -> [b, 2c, ...], the inverse of `stack`."""
    two_b, c = x.shape[:2]
    x = x.reshape(2, two_b // 2, c, *x.shape[2:]).swapaxes(0, 1)
    return x.reshape(two_b // 2, 2 * c, *x.shape[3:])
