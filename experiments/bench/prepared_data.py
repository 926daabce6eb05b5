"""Training from prepared token shards at a corpus size that matters: memory and exact resume.

    python experiments/bench/prepared_data.py [--megabytes 200] [--steps 500] [--work DIR]

1. Writes a corpus of at least `--megabytes` MB of text as .jsonl (the shipped plays' scenes, each
   followed by a synthetic variant, repeated with different synthetic seeds until large enough).
2. `hybrax-data prepare` with the shipped BPE tokenizer: wall time and throughput.
3. Trains a tiny model for `--steps` steps from the shards, and for comparison from the same
   .jsonl read as text, and reads the trainer's resident memory (VmRSS, /proc) at step 10 and at
   the last step.
4. SIGKILL at step `steps // 2` of a run from the shards, then the same command again: every loss
   compared with the uninterrupted run.

Prints one table and the resume check. Results: experiments/bench/RESULTS.md.
"""

import argparse
import json
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = "shakespeare_bpe2048.json"
MODEL = ["model.d_model=64", "model.num_layers=2", "model.num_heads=2", "model.dtype=float32", "data.seq_len=128",
         "data.batch_size=16", "optim.warmup_steps=20", "train.log_every=1", "train.eval_every=1000000",
         "train.eval_batches=4", "log.sample_tokens=0", "log.progress_bar=false", "log.tensorboard=false",
         f"data.tokenizer={TOKENIZER}"]


def write_corpus(folder: pathlib.Path, megabytes: int) -> int:
    sys.path.insert(0, str(ROOT))
    from hybrax.train import corpus, plays

    train, val = plays.shakespeare()
    scenes = train + val
    size, seed = 0, 0
    folder.mkdir(parents=True, exist_ok=True)
    while size < megabytes * 10**6:
        synthetic, _ = corpus.synthetic(num_documents=len(scenes), seed=seed)
        with open(folder / f"part-{seed:03d}.jsonl", "w") as f:
            for scene, extra in zip(scenes, synthetic):
                line = json.dumps({"text": scene + "\n\n" + extra}) + "\n"
                f.write(line)
                size += len(scene.encode()) + 2 + len(extra.encode())
        seed += 1
    return size


def command(run_dir, *overrides) -> list[str]:
    return [sys.executable, "-m", "hybrax.train", "--config", "quickstart.yaml", "--run-dir", str(run_dir), *MODEL,
            *overrides]


def records(run_dir) -> list[dict]:
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def train_watching_memory(run_dir, steps: int, *overrides) -> dict:
    proc = subprocess.Popen(command(run_dir, f"train.steps={steps}", *overrides), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, t0 = {}, time.perf_counter()
    while proc.poll() is None:
        done = max((r["step"] for r in records(run_dir)), default=0)
        for mark in (10, steps):
            if done >= mark and mark not in seen:
                seen[mark] = rss_mib(proc.pid)
        time.sleep(0.02)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{out[-3000:]}")
    return {"rss": seen, "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--megabytes", type=int, default=200)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    args = p.parse_args()
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="prepared_data_"))
    text_dir, prepared = work / "corpus", work / "prepared"

    t = time.perf_counter()
    size = write_corpus(text_dir, args.megabytes)
    print(f"corpus: {size / 1e6:,.1f} MB of text in {text_dir} ({time.perf_counter() - t:.1f}s)")
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hybrax.train.prepare", "prepare", "--config", "quickstart.yaml",
                           "--out", str(prepared), "data.source=files", f"data.path={text_dir}",
                           "data.val_fraction=0.001", f"data.tokenizer={TOKENIZER}"],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    seconds = time.perf_counter() - t
    print(done.stdout.strip())
    print(f"prepare: {seconds:.1f}s wall, {size / 1e6 / seconds:.1f} MB/s of text")

    shards = ["data.source=prepared", f"data.path={prepared}"]
    text = ["data.source=files", f"data.path={text_dir}", "data.val_fraction=0.001"]
    rows = []
    for name, overrides in (("prepared shards", shards), ("text (.jsonl)", text)):
        result = train_watching_memory(work / f"run-{name.split()[0]}", args.steps, *overrides)
        rows.append((name, result["rss"].get(10), result["rss"].get(args.steps), result["seconds"]))
    print(f"\n| data | RSS at step 10 (MiB) | RSS at step {args.steps} (MiB) | wall (s) |\n|---|---|---|---|")
    for name, early, late, seconds in rows:
        print(f"| {name} | {early:,.0f} | {late:,.0f} | {seconds:.0f} |")

    steps = min(args.steps, 120)
    reference = work / "resume-reference"
    subprocess.run(command(reference, f"train.steps={steps}", "checkpoint.every=20", *shards), cwd=ROOT,
                   capture_output=True, check=True)
    killed = work / "resume-killed"
    proc = subprocess.Popen(command(killed, f"train.steps={steps}", "checkpoint.every=20", *shards), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while max((r["step"] for r in records(killed)), default=0) < steps // 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(command(killed, f"train.steps={steps}", "checkpoint.every=20", *shards), cwd=ROOT,
                   capture_output=True, check=True)
    losses = lambda d: {r["step"]: r["loss"] for r in records(d) if "tokens_per_s" in r}  # noqa: E731
    a, b = losses(reference), losses(killed)
    steps_once = [r["step"] for r in records(killed) if "tokens_per_s" in r] == list(range(1, steps + 1))
    print(f"\nSIGKILL at step {steps // 2} of {steps}, rerun: {sum(a[s] == b[s] for s in a)}/{len(a)} losses equal "
          f"to the bit, every step once in metrics.jsonl: {steps_once}")


if __name__ == "__main__":
    main()
