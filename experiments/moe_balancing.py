"""Train configs/moe.yaml with each load-balancing method alone and compare the expert load.

    python experiments/moe_balancing.py --out runs/moe_balancing [--steps 800] [--only none bias]

Variants (overrides on top of the preset, which has z-loss 1e-3 in all of them):

- `none`: no balance loss, no bias;
- `switch_micro`: switch loss 0.01, counts per micro-batch (8 rows of the 32-row step);
- `switch_global`: switch loss 0.01, counts over the global batch (the preset's setting);
- `bias`: auxiliary-loss-free balancing, bias step 1e-3, no balance loss.

Each variant is one `hybrax-train` run in `<out>/<variant>` (a finished run is reused, an
interrupted one resumes). The table reads each run's `metrics.jsonl`: the imbalance (max load / mean
load) of every MoE layer averaged over the last `--tail` logged steps, the final validation bits
per byte and the training throughput.
"""

import argparse
import json
import pathlib
import subprocess
import sys

VARIANTS = {
    "none": ["model.moe.balance_loss_weight=0", "model.moe.bias_update_rate=0"],
    "switch_micro": ["model.moe.balance_loss_weight=0.01", "model.moe.balance_scope=micro"],
    "switch_global": ["model.moe.balance_loss_weight=0.01", "model.moe.balance_scope=global"],
    "bias": ["model.moe.balance_loss_weight=0", "model.moe.bias_update_rate=1e-3"],
}


def records(run_dir: pathlib.Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def summarize(run_dir: pathlib.Path, tail: int) -> dict:
    rows = records(run_dir)
    train = [r for r in rows if "tokens_per_s" in r][-tail:]
    layers = sorted({k[:-len("/imbalance")] for r in train for k in r if k.endswith("/imbalance")})
    evals = [r for r in rows if "val_bpb" in r]
    return {"step": train[-1]["step"] if train else 0,
            "imbalance": {layer: sum(r[f"{layer}/imbalance"] for r in train) / len(train) for layer in layers},
            "load": {layer: train[-1][f"{layer}/load"] for layer in layers},
            "val_bpb": evals[-1]["val_bpb"] if evals else float("nan"),
            "tokens_per_s": sum(r["tokens_per_s"] for r in train) / max(len(train), 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs") / "moe_balancing")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--tail", type=int, default=5, help="logged steps the imbalance is averaged over")
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    for name in args.only:
        run_dir = args.out / name
        if summarize(run_dir, args.tail)["step"] >= args.steps:
            continue
        subprocess.run([sys.executable, "-m", "hybrax.train", "--config", "moe.yaml", "--run-dir", str(run_dir),
                        f"train.steps={args.steps}", "log.progress_bar=false", *VARIANTS[name]], check=True)
    print(f"max load / mean load of each MoE layer, mean of the last {args.tail} logged steps "
          f"(1 = balanced, 4 = top-2 of 8 all on two experts)")
    print(f"{'variant':<14} {'step':>5} {'layer 1':>8} {'layer 3':>8} {'val_bpb':>8} {'tok/s':>8}  final load of layer 3")
    for name in args.only:
        s = summarize(args.out / name, args.tail)
        imbalance = list(s["imbalance"].values())
        cells = " ".join(f"{v:8.2f}" for v in imbalance)
        load = " ".join(f"{v:.3f}" for v in list(s["load"].values())[-1]) if s["load"] else ""
        print(f"{name:<14} {s['step']:>5} {cells} {s['val_bpb']:8.3f} {s['tokens_per_s']:8.0f}  {load}")


if __name__ == "__main__":
    main()
