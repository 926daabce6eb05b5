"""How much of the true attention mass each training-free block selector keeps, on a trained model.

    python experiments/sparse_prefill_recall.py --run /tmp/runs/quickstart --rows 32 \\
        --lengths 128 512 --blocks 16 32

For each length T (with its block size), the first T + 1 bytes of `--rows` validation scenes
(train/corpus.py's held-out plays, one scene per row, BOS first) run through the model. For every
attention layer and head, the dense causal softmax of the layer's own q and k gives each query's
mass; a selector's recall is the fraction of it inside the listed blocks (1 = exact), averaged
over queries, heads, layers and rows; p10 is the 10th percentile over queries. Density is listed
causal blocks / all causal blocks. bpb is the validation bits per byte of the whole model with the
selector in every attention layer (`model.attention.prefill_selector`, through block_sparse_attention),
next to the dense model's. MInference is shown at the paper's sizes (vertical 1000, slash 6096,
meant for 128k prompts) and at the same fractions of T.

The checkpoint's parameters are read by name from the saved train state, so runs saved before or
after changes to the rest of the train state (optimiser, model state) load alike.
"""

import argparse
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from hybrax.layers.embeddings import apply_rotary  # noqa: E402
from hybrax.layers.projection import project  # noqa: E402
from hybrax.layers.sparse.prefill import SELECTORS, blocks  # noqa: E402
from hybrax.train.plays import shakespeare  # noqa: E402
from hybrax.train.tokenizer import ByteTokenizer  # noqa: E402


def load_params(run_dir: pathlib.Path):
    """(config, params nnx.State) of the latest checkpoint of a `hybrax-train` run."""
    import orbax.checkpoint as ocp

    from hybrax.train.config import load_config
    from hybrax.train.step import create_model

    config = load_config(run_dir / "config.yaml")
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute(), item_names=("state", "data"),
                                    item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                   "data": ocp.JsonCheckpointHandler()})
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir / 'checkpoints'}; train first (hybrax-train)")
    stored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]
    manager.close()
    params = nnx.state(create_model(config.model, 0), nnx.Param)

    def stored_value(path, _):
        node = stored
        for key in path:
            node = node[str(key.key)]
        return jnp.asarray(node["value"] if isinstance(node, dict) else node)

    params.replace_by_pure_dict(jax.tree_util.tree_map_with_path(stored_value, params.to_pure_dict()))
    return config, params, step


def validation_rows(length: int, rows: int) -> np.ndarray:
    """int32 [rows, length + 1]: the first length + 1 tokens (BOS first) of the longest-enough scenes."""
    _, val = shakespeare()
    tokenizer = ByteTokenizer()
    docs = [ids for ids in (tokenizer.encode(doc, bos=True) for doc in val) if len(ids) > length]
    if len(docs) < rows:
        raise ValueError(f"rows={rows}: only {len(docs)} validation scenes have more than {length} tokens")
    return np.stack([ids[:length + 1] for ids in docs[:rows]]).astype(np.int32)


def model_with(config, params, **prefill):
    """The trained model with model.attention's prefill settings replaced by `prefill`."""
    from hybrax.arch.config import ModelConfig
    from hybrax.train.step import create_model
    tree = config.model.model_dump()
    tree["attention"] = {**tree.get("attention", {}), **prefill}
    model_config = ModelConfig.model_validate(tree)
    model = create_model(model_config, 0)
    nnx.update(model, params)
    return model


def queries_keys(model, tokens_BxT):
    """[(q [B, T, H, D], k [B, T, Hkv, D]) per attention layer], as the layers compute them."""
    @nnx.jit
    def run(model, tokens_BxT):
        x = model.embed(tokens_BxT)
        positions = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
        out = []
        for block in model.blocks:
            attn, c = block.mixer, block.mixer.config
            h = block.mixer_norm(x)
            out.append((apply_rotary(project("btd,dhk->bthk", h, attn.w_q, c.dtype), positions, c.rope_theta),
                        apply_rotary(project("btd,dhk->bthk", h, attn.w_k, c.dtype), positions, c.rope_theta)))
            x, _ = block(x)
        return out
    return run(model, tokens_BxT)


def bits_per_byte(model, rows_BxT1, batch: int = 8) -> float:
    @nnx.jit
    def losses(model, tokens):
        logits = model(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
    nats = np.concatenate([np.asarray(losses(model, jnp.asarray(rows_BxT1[i:i + batch])))
                           for i in range(0, len(rows_BxT1), batch)])
    return float(nats.mean() / math.log(2))


def budgets(length: int) -> list[tuple[str, dict]]:
    scaled = {"vertical_size": max(1, round(1000 * length / 131072)), "slash_size": max(1, round(6096 * length / 131072))}
    return [("xattention", {}), ("minference", {}), ("minference", scaled), ("flexprefill", {}),
            ("flexprefill", {"js_threshold": None})]


def measure(config, params, length: int, block: int, num_rows: int, batch: int = 8) -> list[str]:
    rows = validation_rows(length, num_rows)
    dense_model = model_with(config, params)
    layers_qk = [queries_keys(dense_model, jnp.asarray(rows[i:i + batch, :-1])) for i in range(0, num_rows, batch)]
    dense_bpb = bits_per_byte(dense_model, rows)
    lines = []
    for name, options in budgets(length):
        @jax.jit
        def score(q, k, name=name, options=options):
            idx = SELECTORS[name](q, k, block_size=block, **options)
            return blocks.attention_recall(q, k, idx, block), blocks.causal_density(idx)
        recalls, densities = [], []
        for chunk in layers_qk:
            for q, k in chunk:
                recall, density = score(q, k)
                recalls.append(np.asarray(recall).ravel())
                densities.append(float(density))
        recall = np.concatenate(recalls)
        sparse_bpb = bits_per_byte(model_with(config, params, prefill_block_size=block, prefill_selector=name,
                                              prefill_options=options), rows)
        knobs = ", ".join(f"{k}={v}" for k, v in options.items()) or "paper default"
        lines.append(f"| {length} | {block} | {name} | {knobs} | {recall.mean():.4f} | {np.percentile(recall, 10):.3f} "
                     f"| {np.mean(densities):.3f} | {sparse_bpb:.4f} | {dense_bpb:.4f} |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="/tmp/runs/quickstart", help="run directory of hybrax-train")
    p.add_argument("--rows", type=int, default=32, help="validation scenes per length")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--blocks", type=int, nargs="+", default=[16, 32], help="block size per length")
    args = p.parse_args(argv)
    if len(args.blocks) != len(args.lengths):
        print(f"error: --blocks {args.blocks} needs one block size per length in --lengths {args.lengths}",
              file=sys.stderr)
        return 2
    config, params, step = load_params(pathlib.Path(args.run))
    print(f"run {args.run} step {step}, trained at seq_len {config.data.seq_len}; {jax.devices()[0].device_kind}")
    print("| T | block | selector | budget | recall | p10 recall | density | bpb sparse | bpb dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for length, block in zip(args.lengths, args.blocks):
        measure(config, params, length, block, args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
