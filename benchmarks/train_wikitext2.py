"""Train a biLM on WikiText-2 for a time budget, report held-out perplexity, export the model.

    .venv/bin/python benchmarks/train_wikitext2.py --minutes 30

Reads ../shared/data/wikitext-2/{train,valid}.txt (one paragraph or heading per line, already
tokenized, rare words already `<unk>`). Builds the vocabulary from train.txt (frequency sorted,
<S> </S> <UNK> first), trains with the bilm-tf recipe (sampled softmax,
Adagrad 0.2, clip 10, dropout 0.1, state carried) for `--minutes` of training time, then:

* held-out perplexity on valid.txt with the FULL softmax (bilm-tf run_test: unroll 1, batch 256,
  state carried, exp of the mean per-batch loss), forward / backward / average;
* training throughput (tokens/s over the whole run);
* the model exported to `<work-dir>/model` (options.json + weights.hdf5) for the downstream
  tasks (`elmo embed|classify|ner --model <work-dir>/model`);
* everything in `<work-dir>/results.json`; the run (checkpoint, metrics.jsonl, perplexity.png)
  in `<work-dir>/run`. Re-running with the same arguments and --resume continues the run.

The default `wt2` configuration is sized for a 2-core CPU: between the `tiny` preset and the
released `small` model (LSTM 2 x 256 cells, projection 64, char CNN of 512 filters up to width 6,
1 highway; 1.2M biLM parameters + a 33k x 64 softmax), batch 32 x unroll 20, 1024 negatives.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from torch_elmo import data, textio  # noqa: E402
from torch_elmo.config import Options, preset  # noqa: E402
from torch_elmo.evaluate import perplexity  # noqa: E402
from torch_elmo.checkpoint import export_run, load_checkpoint, load_language_model  # noqa: E402
from torch_elmo.train import train  # noqa: E402
from torch_elmo.vocab import Vocabulary, build_vocabulary  # noqa: E402

CONFIGS = {
    # 2-core CPU: a few thousand tokens/s, several epochs of WikiText-2 in 30 minutes
    "wt2": preset("wt2").to_dict(),
    # a GPU: the released small model's shape
    "small": {**preset("small").to_dict(), "batch_size": 128, "unroll_steps": 20,
              "n_negative_samples_batch": 8192},
    # seconds: smoke test of the script
    "tiny": {**preset("tiny").to_dict(), "batch_size": 16, "unroll_steps": 20,
             "n_negative_samples_batch": 256},
}


def build_vocab(train_file: str, out: str) -> Vocabulary:
    counts: collections.Counter = collections.Counter()
    for _, tokens in textio.iter_sentences(train_file):
        counts.update(tokens)
    vocab = build_vocabulary(counts, unk_words=["<unk>"])   # WikiText-2's rare-word marker -> <UNK>
    vocab.write(out)
    return Vocabulary.read(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "wikitext-2"))
    p.add_argument("--work-dir", default=str(REPO / "runs" / "wikitext2"))
    p.add_argument("--config", choices=sorted(CONFIGS), default="wt2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: all cores, or 1 when the machine is "
                        "already busy: spinning threads on shared cores run ~10x slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=500, help="batches between held-out evals")
    p.add_argument("--eval-batches", type=int, default=100,
                   help="held-out batches (of 256) for the evals DURING training; the final "
                        "evaluation reads all of valid.txt")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads is None and args.device == "cpu":
        cores = os.cpu_count() or 1
        args.threads = 1 if os.getloadavg()[0] >= cores - 0.5 else torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)

    train_file = os.path.join(args.data, "train.txt")
    valid_file = os.path.join(args.data, "valid.txt")
    for f in (train_file, valid_file):
        if not os.path.exists(f):
            print(f"train_wikitext2: {f} not found (--data)", file=sys.stderr)
            return 2
    work = Path(args.work_dir)
    run_dir, model_dir = work / "run", work / "model"
    work.mkdir(parents=True, exist_ok=True)
    vocab_file = str(work / "vocab.txt")
    vocab = build_vocab(train_file, vocab_file)
    options = Options.from_dict(json.loads(json.dumps(CONFIGS[args.config])), source=args.config)
    print(f"vocabulary: {len(vocab):,} types ({vocab_file}); config {args.config}; "
          f"budget {args.minutes:g} min of training on {args.device}"
          f" with {torch.get_num_threads()} thread(s)", flush=True)

    t0 = time.time()
    train(options, vocab, [train_file], str(run_dir), heldout_files=[valid_file],
          epochs=1000, max_time=args.minutes * 60.0, seed=args.seed, resume=args.resume,
          log_every=50, eval_every=args.eval_every, checkpoint_every=500,
          heldout_batch_size=256, heldout_max_batches=args.eval_batches, device=args.device,
          progress=not args.no_progress, vocab_path=vocab_file)
    wall_train = time.time() - t0
    ckpt = load_checkpoint(str(run_dir))

    t1 = time.time()
    lm, _ = load_language_model(str(run_dir), device=args.device)
    stream = data.LMBatchStream([valid_file], vocab, 256, 1,
                                max_chars=options.char_cnn.max_characters_per_token,
                                shuffle=False, loop=False)
    ppl = perplexity(lm, stream, device=args.device)
    eval_s = time.time() - t1
    export_run(str(run_dir), str(model_dir))

    results = {
        "config": args.config, "options": json.loads(ckpt["options"]),
        "vocab_size": len(vocab), "device": args.device, "threads": torch.get_num_threads(),
        "budget_minutes": args.minutes, "steps": ckpt["step"], "train_tokens": ckpt["tokens"],
        "epochs": round(ckpt["tokens"] / ckpt["run"]["n_train_tokens"], 3),
        "train_seconds": round(ckpt["elapsed"], 1),
        "update_seconds": round(ckpt["step_time"], 1),
        # throughput of the updates themselves (held-out evaluations during training excluded)
        "tokens_per_s": round(ckpt["tokens"] / max(ckpt["step_time"], 1e-9), 1),
        "valid_perplexity": {k: round(ppl[k], 3) for k in ("forward", "backward", "average")},
        "valid_batches": ppl["n_batches"], "valid_eval_seconds": round(eval_s, 1),
        "wall_seconds_train_call": round(wall_train, 1),
        "model_dir": str(model_dir), "run_dir": str(run_dir),
        "command": " ".join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(
            str(REPO)) else sys.executable, "benchmarks/train_wikitext2.py", *sys.argv[1:]]),
    }
    with open(work / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps({k: results[k] for k in ("steps", "train_tokens", "epochs", "tokens_per_s",
                                              "valid_perplexity")}))
    print(f"valid.txt perplexity (full softmax, {ppl['n_batches']} batches of 256, unroll 1): "
          f"forward {ppl['forward']:.2f}  backward {ppl['backward']:.2f}  "
          f"average {ppl['average']:.2f}")
    print(f"training: {ckpt['step']:,} updates, {ckpt['tokens']:,} tokens "
          f"({results['epochs']} epochs) in {ckpt['elapsed']:.0f} s "
          f"({ckpt['step_time']:.0f} s in updates: {results['tokens_per_s']:,.0f} tokens/s)")
    print(f"exported model: {model_dir}/options.json + weights.hdf5; results: {work}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
