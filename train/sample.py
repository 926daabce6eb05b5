"""Generate text from a run's latest checkpoint with a KV cache.

    hybrax-sample --run runs/quickstart --prompt "ROMEO:" --max-new-tokens 200
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrax.arch import CausalLM
from hybrax.train.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer


def generate(model: CausalLM, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 40, seed: int = 0, tokenizer: Tokenizer | None = None,
             modality: int | None = None) -> str:
    """Sample `max_new_tokens` tokens after `prompt`; stops early at EOS. Temperature 0 is greedy.
    `tokenizer`: the run's (data.tokenizer; bytes when None). Ids past its vocabulary (a model
    vocabulary padded beyond it) are never sampled. `modality`: for a model with MoMa layers, the
    modality id of the prompt's and the generated tokens (0 when None), which picks the experts
    they are routed among; a model without them takes none."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"top_k={top_k} must be in [1, {model.config.vocab_size}]")
    groups = model.config.modality_groups()
    if modality is not None and groups is None:
        raise ValueError(f"modality={modality}: the model has no modality-routed layers (MoMa); leave it unset")
    if modality is not None and not 0 <= modality < groups:
        raise ValueError(f"modality={modality} must be in [0, {groups - 1}] (the model's MoMa groups)")
    tokenizer = tokenizer or ByteTokenizer()
    prompt_ids = tokenizer.encode(prompt, bos=True).astype(np.int32)[None, :]
    vocab = tokenizer.vocab_size
    graphdef, params = nnx.split(model)
    cache = model.init_cache(1, prompt_ids.shape[1] + max_new_tokens)

    @jax.jit
    def forward(params, cache, tokens_1xT):
        modality_ids = None if groups is None else jnp.full(tokens_1xT.shape, modality or 0, jnp.int32)
        logits, cache = nnx.merge(graphdef, params)(tokens_1xT, cache=cache, modality_ids=modality_ids)
        return logits[:, -1], cache

    @jax.jit
    def choose(logits_1xV, key):
        logits_1xV = jnp.where(jnp.arange(logits_1xV.shape[-1]) < vocab, logits_1xV, -jnp.inf)
        if temperature == 0:
            return jnp.argmax(logits_1xV, axis=-1)
        logits_1xV = logits_1xV / temperature
        if top_k is not None:
            kth = jax.lax.top_k(logits_1xV, top_k)[0][:, -1:]
            logits_1xV = jnp.where(logits_1xV < kth, -jnp.inf, logits_1xV)
        return jax.random.categorical(key, logits_1xV, axis=-1)

    logits, cache = forward(params, cache, jnp.asarray(prompt_ids))
    key = jax.random.key(seed)
    out = []
    for _ in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token = choose(logits, sub)
        if int(token[0]) == tokenizer.specials.eos:
            break
        out.append(int(token[0]))
        logits, cache = forward(params, cache, token[:, None].astype(jnp.int32))
    return prompt + tokenizer.decode(np.array(out))


def restore_latest(run_dir: pathlib.Path):
    """(config, step, graphdef, TrainState, data iterator state) of the latest checkpoint in
    `run_dir`, restored onto the config saved beside it (config.yaml). FileNotFoundError without one."""
    from hybrax.train.checkpoint import Checkpointer
    from hybrax.train.config import load_config
    from hybrax.train.optim import make_optimizer
    from hybrax.train.step import abstract_state

    config = load_config(run_dir / "config.yaml")
    checkpointer = Checkpointer(run_dir, config.checkpoint)
    step = checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {str(run_dir / 'checkpoints')!r}; train first (hybrax-train)")
    graphdef, target = abstract_state(config.model, make_optimizer(config.optim, config.train.steps))
    state, data_state = checkpointer.restore(step, target)
    checkpointer.close()
    return config, step, graphdef, state, data_state


def load_latest(run_dir: pathlib.Path) -> tuple[CausalLM, Tokenizer]:
    """The model of the latest checkpoint in `run_dir`, built from its saved config.yaml, and the
    run's tokenizer."""
    from hybrax.train.step import merge_model

    config, _, graphdef, state, _ = restore_latest(run_dir)
    return merge_model(graphdef, state), load_tokenizer(config.data.tokenizer)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hybrax-sample", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run directory holding config.yaml and checkpoints/")
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modality", type=int, default=None, help="MoMa models: the modality id to route by (0)")
    args = p.parse_args(argv)
    run_dir = pathlib.Path(args.run)
    if not (run_dir / "config.yaml").is_file():
        print(f"error: --run {args.run!r} has no config.yaml; expected a run directory of hybrax-train",
              file=sys.stderr)
        return 2
    try:
        model, tokenizer = load_latest(run_dir)
        print(generate(model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, seed=args.seed, tokenizer=tokenizer,
                       modality=args.modality))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
