"""`elmo vocab`, `elmo train`, `elmo test`, `elmo export`: the biLM's life from a corpus to an
exported model (bilm-tf's train_elmo.py / restart.py, run_test.py, dump_weights.py)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from ..config import PRESETS, RECIPES, ElmoError, Options, preset, read_options, with_recipe
from ..device import resolve_device
from .common import add_progress_flags, argv_from_args, at_least, bilm_tf, warnings_as_lines


def add_vocab_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, help="glob of training files (quote it)")
    p.add_argument("--out", required=True, help="vocabulary file to write")
    p.add_argument("--min-count", type=int, default=1)
    p.add_argument("--max-size", type=int, default=None, help="including the 3 specials")
    p.add_argument("--unk-word", action="append", default=[], metavar="WORD",
                   help="the corpus's marker of rare words (WikiText's '<unk>'), repeatable: left "
                        "out of the vocabulary, so its occurrences train the <UNK> class")


def add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", bilm_tf("--train_prefix"), required=True,
                   help="glob of training files, one sentence per line")
    p.add_argument("--vocab", bilm_tf("--vocab_file"), required=True)
    p.add_argument("--save-dir", bilm_tf("--save_dir"), required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=list(PRESETS), default=None)
    g.add_argument("--options", default=None, help="options.json (bilm-tf form)")
    p.add_argument("--heldout", default=None, help="glob of held-out files for perplexity")
    p.add_argument("--epochs", bilm_tf("--n_epochs"), type=float, default=None,
                   help="passes over the data, may be fractional (default: the options' n_epochs)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="stop after this many training tokens (whole run, resumes included)")
    p.add_argument("--max-time", type=float, default=None,
                   help="stop after this many seconds (whole run, resumes included)")
    p.add_argument("--batch-size", bilm_tf("--batch_size"), type=int, default=None)
    p.add_argument("--unroll-steps", type=int, default=None)
    p.add_argument("--n-negative-samples", type=int, default=None)
    p.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="training procedure: bilm-tf (default: its recipe exactly) or fast "
                        "(AdamW, warm-up, cosine decay over the run's horizon, no dropout, "
                        "4,096 negatives, bf16 where native; README)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="default: the recipe's (bilm-tf 0.2, fast 1e-2)")
    p.add_argument("--clip-norm", type=float, default=None)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--state-reset-prob", type=float, default=None,
                   help="zero each row's carried LSTM state before a batch with this probability")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from save-dir's checkpoint")
    p.add_argument("--init-from", default=None,
                   help="a run directory or an exported model dir/weights.hdf5 to fine-tune from")
    p.add_argument("--log-every", type=int, default=100, help="batches between log lines")
    p.add_argument("--eval-every", type=int, default=1000, help="batches between held-out evals")
    p.add_argument("--checkpoint-every", type=int, default=1250, help="batches between checkpoints")
    p.add_argument("--heldout-max-batches", type=int, default=None,
                   help="cap on held-out batches per evaluation (default: all)")
    p.add_argument("--heldout-batch-size", type=int, default=256,
                   help="batch size of held-out evaluations (unroll 1, as `elmo test`)")
    p.add_argument("--n-train-tokens", bilm_tf("--n_train_tokens"), type=int, default=None,
                   help="tokens per epoch (default: counted from --train, or the options' value)")
    p.add_argument("--nproc", bilm_tf("--n_gpus"), type=int, default=None,
                   help="processes on this machine: runs `torchrun --standalone --nproc_per_node "
                        "N -m torch_elmo train ...` (batch size is per process)")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a rank waits for the others in a collective before it stops "
                        "with an error (several processes only; must exceed a held-out "
                        "evaluation, which the other ranks wait for)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    add_progress_flags(p)


def add_test_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test", bilm_tf("--test_prefix"), required=True, help="glob of held-out files")
    p.add_argument("--vocab", bilm_tf("--vocab_file"), required=True)
    p.add_argument("--save-dir", bilm_tf("--save_dir"), required=True)
    p.add_argument("--batch-size", bilm_tf("--batch_size"), type=int, default=256,
                   help="rows per batch (unroll is 1)")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")


def add_export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save-dir", bilm_tf("--save_dir"), required=True,
                   help="training run directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="directory for options.json + weights.hdf5")
    # bilm-tf's dump_weights.py: the weight file's path; options.json is written beside it
    g.add_argument(bilm_tf("--outfile"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--safetensors", action="store_true",
                   help="also write weights.safetensors (the same arrays; needs safetensors)")


def cmd_vocab(args) -> int:
    from ..outputs import check_output
    from ..textio import BadLines, expand_glob, name_files
    from ..vocab import build_vocabulary, count_words
    at_least("--min-count", args.min_count, 1)
    at_least("--max-size", args.max_size, 3)
    files = expand_glob(args.train)
    if os.path.isdir(args.out):
        raise ElmoError(f"--out {args.out} is a directory, expected a file path")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    check_output(args.out, "--out", files)
    bad = BadLines()
    with warnings_as_lines("vocab"):
        counts = count_words(files, bad)
    n_tokens = sum(counts.values())
    if n_tokens == 0:
        raise ElmoError(f"{name_files(files)}: no tokens (empty or blank files)")
    vocab = build_vocabulary(counts, min_count=args.min_count, max_size=args.max_size,
                             unk_words=args.unk_word)
    if len(vocab) == 3:
        raise ElmoError(f"--min-count {args.min_count} keeps no word (the most frequent occurs "
                        f"{max(counts.values())} times): nothing written; lower --min-count")
    covered = sum(counts[t] for t in vocab.tokens)
    vocab.write(args.out)
    print(f"{n_tokens} tokens ({len(counts)} distinct) in {len(files)} file(s)"
          + (f", {bad.count} non-UTF-8 line(s) skipped" if bad.count else ""))
    print(f"wrote {args.out}: vocabulary size {len(vocab)} (3 specials + {len(vocab) - 3} words), "
          f"covering {100.0 * covered / n_tokens:.2f}% of the tokens")
    print(f"n_train_tokens = {n_tokens}")
    for w in args.unk_word:
        print(f"--unk-word {w}: {counts.get(w, 0)} occurrence(s) are <UNK> targets")
    if "<unk>" in counts and "<unk>" not in args.unk_word:
        print(f"note: the corpus has the word '<unk>' {counts['<unk>']} times, kept as a word, so "
              f"the model never learns <UNK> and every unknown word of new text gets a near-zero "
              f"probability; if '<unk>' marks rare words (WikiText), pass --unk-word '<unk>'",
              file=sys.stderr)
    return 0


def options_from_args(args, base: Optional[Options] = None) -> Options:
    """--options FILE | --preset NAME | `base` (resume / init-from) | the small preset, then the
    per-flag overrides. A preset brings bilm-tf's training defaults (Options' defaults)."""
    if args.options:
        options = read_options(args.options)
    elif args.preset:
        options = preset(args.preset)
    elif base is not None:
        options = base
    else:
        options = preset("small")
    overrides = {"batch_size": args.batch_size, "unroll_steps": args.unroll_steps,
                 "n_negative_samples_batch": args.n_negative_samples,
                 "learning_rate": args.learning_rate, "all_clip_norm_val": args.clip_norm,
                 "dropout": args.dropout,
                 "state_reset_prob": getattr(args, "state_reset_prob", None)}
    recipe = getattr(args, "recipe", None)
    if recipe is None and base is not None and base.recipe != options.recipe:
        # --resume keeps the run's recipe (and the values it set) unless told otherwise
        options = options.replace(recipe=base.recipe, **{
            k: getattr(base, k) for k in RECIPES[base.recipe]["options"]})
    elif recipe is not None and recipe != options.recipe:
        options = with_recipe(options, recipe)
    options = options.replace(**{k: v for k, v in overrides.items() if v is not None})
    for k in ("batch_size", "unroll_steps", "n_negative_samples_batch"):
        if getattr(options, k) < 1:
            raise ElmoError(f"{k} must be >= 1, got {getattr(options, k)}")
    if not 0.0 <= options.dropout < 1.0:
        raise ElmoError(f"dropout must be in [0, 1), got {options.dropout}")
    if not 0.0 <= options.state_reset_prob < 1.0:
        raise ElmoError(f"state_reset_prob must be in [0, 1), got {options.state_reset_prob}")
    if options.learning_rate <= 0 or options.all_clip_norm_val <= 0:
        raise ElmoError("learning_rate and all_clip_norm_val must be > 0")
    return options


def check_train_args(args) -> None:
    """The run-control flags of `elmo train`, all checked before anything is read."""
    if args.epochs is not None and args.epochs <= 0:
        raise ElmoError(f"--epochs must be > 0, got {args.epochs:g}")
    for flag in ("log_every", "eval_every", "checkpoint_every", "heldout_batch_size",
                 "n_train_tokens", "max_tokens", "heldout_max_batches"):
        at_least(f"--{flag.replace('_', '-')}", getattr(args, flag, None), 1)
    if args.max_time is not None and args.max_time <= 0:
        raise ElmoError(f"--max-time must be > 0 seconds, got {args.max_time:g}")
    if (getattr(args, "dist_timeout", None) or 600.0) <= 0:
        raise ElmoError(f"--dist-timeout must be > 0, got {args.dist_timeout:g}")
    if os.path.exists(args.save_dir) and not os.path.isdir(args.save_dir):
        raise ElmoError(f"--save-dir {args.save_dir} is a file, expected a directory")
    if os.path.isdir(args.vocab):
        raise ElmoError(f"--vocab {args.vocab} is a directory, expected the vocabulary file")


def cmd_train(args) -> int:
    from .. import checkpoint as ck
    from .. import distributed, train
    from ..textio import expand_glob
    from ..vocab import Vocabulary
    nproc = getattr(args, "nproc", None)
    at_least("--nproc", nproc, 1)
    if nproc is not None and nproc > 1:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ElmoError("--nproc inside torchrun: use one or the other")
        return distributed.spawn_torchrun(nproc, "train", argv_from_args(args, add_train_flags))
    check_train_args(args)
    with warnings_as_lines("train"):
        device = resolve_device(args.device)
        rank, world_size, device = distributed.init_distributed(device, args.dist_timeout or 600.0)
        if world_size > 1:
            distributed.on_sigterm_say_why(rank, "train")
        train_files = expand_glob(args.train)
        heldout_files = expand_glob(args.heldout) if args.heldout else None
        vocab = Vocabulary.read(args.vocab)
        base, epochs = None, args.epochs
        if args.resume:   # the checkpoint is read once here for its options and epochs
            path = os.path.join(args.save_dir, ck.CHECKPOINT)
            saved = ck.load_checkpoint(path)
            base = ck.checkpoint_options(saved, path)
            if epochs is None:
                epochs = float(saved["run"]["epochs"])
            del saved
        elif args.init_from and not (args.options or args.preset):
            src = ck.resolve_init_from(args.init_from)[0]
            base = Options(lstm=src.lstm, char_cnn=src.char_cnn, bidirectional=src.bidirectional)
        options = options_from_args(args, base)
        if base is None and not (args.options or args.preset) and rank == 0:
            print("note: no --preset or --options: training the `small` architecture (2 x LSTM "
                  "1024 / projection 128, one highway); bilm-tf's train_elmo.py trains "
                  "`--preset original`", file=sys.stderr, flush=True)
        if (not args.resume and os.path.exists(os.path.join(args.save_dir, ck.CHECKPOINT))
                and args.init_from is None):
            raise ElmoError(f"{args.save_dir} already holds a checkpoint: add --resume to continue "
                            f"it, or choose another --save-dir")
        try:
            train.train(options, vocab, train_files, args.save_dir, heldout_files=heldout_files,
                        epochs=epochs, n_train_tokens=getattr(args, "n_train_tokens", None),
                        max_tokens=args.max_tokens, max_time=args.max_time, seed=args.seed,
                        resume=args.resume, init_from=args.init_from, log_every=args.log_every,
                        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                        heldout_batch_size=getattr(args, "heldout_batch_size", 256),
                        heldout_max_batches=args.heldout_max_batches, device=device,
                        bf16=args.bf16, progress=getattr(args, "progress", None),
                        vocab_path=args.vocab,
                        rank=rank, world_size=world_size)
        except KeyboardInterrupt:
            if world_size > 1:   # all ranks stopped at the same step: the group is healthy
                print("elmo train: interrupted", file=sys.stderr)
                distributed.leave_group(rank, 130)
            raise
    if world_size > 1:   # only after a clean finish: a broken group may hang in teardown
        distributed.leave_group(rank, 0)
    return 0


def cmd_test(args) -> int:
    from ..checkpoint import load_language_model, same_vocabulary
    from ..data import LMBatchStream
    from ..evaluate import perplexity
    from ..textio import expand_glob
    from ..vocab import Vocabulary
    at_least("--batch-size", args.batch_size, 1)
    at_least("--max-batches", args.max_batches, 1)
    with warnings_as_lines("test"):
        device = resolve_device(args.device)
        files = expand_glob(args.test)
        vocab = Vocabulary.read(args.vocab)
        lm, ckpt = load_language_model(args.save_dir, device)
        if not same_vocabulary(ckpt, vocab):
            v = ckpt["vocab"]
            raise ElmoError(f"{args.vocab} ({len(vocab)} tokens) is not the vocabulary the model "
                            f"in {args.save_dir} was trained with ({v['path']}, {v['size']} tokens)")
        stream = LMBatchStream(files, vocab, args.batch_size, 1,
                               max_chars=lm.options.char_cnn.max_characters_per_token,
                               seed=0, shuffle=False, loop=False,
                               bidirectional=lm.options.bidirectional)
        ppl = perplexity(lm, stream, max_batches=args.max_batches, device=device)
    print(f"forward perplexity:  {ppl['forward']:.3f}")
    print(f"backward perplexity: {ppl['backward']:.3f}")
    print(f"average perplexity:  {ppl['average']:.3f}")
    print(f"({ppl['n_batches']:,} batches of {args.batch_size}, {ppl['n_tokens']:,} targets "
          f"per direction, full softmax)", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from ..checkpoint import OPTIONS, export_run
    from ..outputs import check_output
    outfile = getattr(args, "outfile", None)
    if outfile is not None:   # bilm-tf's --outfile FILE: the weights there, options.json beside
        check_output(outfile, "--outfile")
        out_dir, weight_name = os.path.split(os.path.abspath(outfile))
        if os.path.exists(os.path.join(args.save_dir, OPTIONS)) and \
                os.path.samefile(out_dir, args.save_dir):
            raise ElmoError(f"--outfile {outfile}: options.json beside it would replace the "
                            f"run's training options in {args.save_dir}; write it elsewhere")
    else:
        out_dir, weight_name = check_output(args.out, "--out", directory=True), "weights.hdf5"
    options_file, weight_file = export_run(args.save_dir, out_dir,
                                           safetensors=getattr(args, "safetensors", False),
                                           weight_name=weight_name)
    print(f"wrote {options_file} and {weight_file}")
    return 0


COMMANDS = {
    "vocab": ("build a frequency-sorted vocabulary from a corpus", add_vocab_flags, cmd_vocab),
    "train": ("train a biLM (bilm-tf train_elmo.py / restart.py)", add_train_flags, cmd_train),
    "test": ("held-out perplexity with the full softmax (bilm-tf run_test.py)", add_test_flags,
             cmd_test),
    "export": ("write options.json + weights.hdf5 from a run (bilm-tf dump_weights.py)",
               add_export_flags, cmd_export),
}
