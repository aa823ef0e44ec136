"""Command line: `elmo <command>` (also `python -m torch_elmo <command>`).

This module owns every parser and every command handler, the one device resolver and the one
warning format, and the error policy: a user error (ElmoError, a missing file, bad input) prints
ONE line `elmo <command>: error: ...` and exits 2, never a trace; a warning is one line
`elmo <command>: warning: ...`. Handlers validate flags, then call the stage modules (imported
when the command runs, so `elmo --help` stays light); the parser functions are the only place
flags are defined, so `elmo <command> --help` is the reference.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from .config import PRESETS, RECIPES, ElmoError, Options, preset, read_options, with_recipe
from .device import resolve_device


def _vocab_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, help="glob of training files (quote it)")
    p.add_argument("--out", required=True, help="vocabulary file to write")
    p.add_argument("--min-count", type=int, default=1)
    p.add_argument("--max-size", type=int, default=None, help="including the 3 specials")
    p.add_argument("--unk-word", action="append", default=[], metavar="WORD",
                   help="the corpus's marker of rare words (WikiText's '<unk>'), repeatable: left "
                        "out of the vocabulary, so its occurrences train the <UNK> class")


def _train_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, help="glob of training files, one sentence per line")
    p.add_argument("--vocab", required=True)
    p.add_argument("--save-dir", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=list(PRESETS), default=None)
    g.add_argument("--options", default=None, help="options.json (bilm-tf form)")
    p.add_argument("--heldout", default=None, help="glob of held-out files for perplexity")
    p.add_argument("--epochs", type=float, default=None,
                   help="passes over the data, may be fractional (default: the options' n_epochs)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="stop after this many training tokens (whole run, resumes included)")
    p.add_argument("--max-time", type=float, default=None,
                   help="stop after this many seconds (whole run, resumes included)")
    p.add_argument("--batch-size", type=int, default=None)
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
    p.add_argument("--n-train-tokens", type=int, default=None,
                   help="tokens per epoch (default: counted from --train, or the options' value)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes on this machine: runs `torchrun --standalone --nproc_per_node "
                        "N -m torch_elmo train ...` (batch size is per process)")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a rank waits for the others in a collective before it stops "
                        "with an error (several processes only; must exceed a held-out "
                        "evaluation, which the other ranks wait for)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or GPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")


def _test_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test", required=True, help="glob of held-out files")
    p.add_argument("--vocab", required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--batch-size", type=int, default=256, help="rows per batch (unroll is 1)")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")


def _export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save-dir", required=True, help="training run directory")
    p.add_argument("--out", required=True, help="directory for options.json + weights.hdf5")
    p.add_argument("--safetensors", action="store_true",
                   help="also write weights.safetensors (the same arrays; needs safetensors)")


def _embed_parser(p: argparse.ArgumentParser) -> None:
    from . import embed   # its state names (torch-heavy: only when `elmo embed` runs)
    p.add_argument("--model", default=None,
                   help="dir with options.json + weights.hdf5, or a pretrained name "
                        "(small, medium, original, original-5.5B; downloaded once, cached in "
                        "$TORCH_ELMO_CACHE or ~/.cache/torch_elmo), or hf://owner/name[@rev]"
                        "[/subfolder] (Hugging Face Hub); or --options-file + --weight-file")
    p.add_argument("--options-file", default=None,
                   help="allennlp's form: options.json (with --weight-file, instead of --model)")
    p.add_argument("--weight-file", default=None,
                   help="allennlp's form: weights.hdf5 (with --options-file)")
    p.add_argument("--input", required=True,
                   help="UTF-8 text file, one whitespace-tokenized sentence a line (dataset "
                        "'i' = line i; bytes that are not UTF-8 become U+FFFD, with a warning "
                        "naming the first file:line)")
    p.add_argument("--output", required=True, help="HDF5 file to write (atomically)")
    p.add_argument("--layers", choices=["all", "top", "average"], default="all",
                   help="all: (3, n, 2P) per line; top: layer 2; average: mean of the 3 layers")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per biLM batch")
    p.add_argument("--state", choices=list(embed.STATE_MODES), default=embed.DEFAULT_STATE,
                   help="initial LSTM state: carry = bilm-tf/allennlp (depends on batch history), "
                        "zero, warm = fixed warmed-up state (default %(default)s; README "
                        "'Inference state')")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--max-tokens", type=int, default=embed.DEFAULT_MAX_TOKENS,
                   help="longer lines are embedded in overlapping windows and rejoined "
                        "(0 = no limit; default %(default)s)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes on this machine: runs `torchrun --standalone --nproc_per_node "
                        "N -m torch_elmo embed ...` (lines dealt out across processes, one output)")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a process waits for the others (several processes only)")
    p.add_argument("--use-sentence-keys", action="store_true",
                   help="name each dataset by its line's text (lines unique and non-empty)")
    p.add_argument("--forget-sentences", action="store_true",
                   help="do not write sentence_to_index")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")


def _classify_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model dir (options.json + weights.hdf5); not needed for --features "
                        "tfidf or --no-elmo")
    p.add_argument("--train", required=True, help="training file")
    p.add_argument("--test", required=True, help="test file")
    p.add_argument("--dev", default=None,
                   help="dev file: choose C (logreg) / alpha (mlp) on it; bilstm: early stopping "
                        "on dev macro-F1 (without it all --epochs run and the last is kept)")
    p.add_argument("--format", choices=["auto", "tsv", "emotion", "sst", "trec"], default="auto",
                   help="tsv: text<TAB>label; emotion: text;label (dair-ai); sst: SST-2 tsv or "
                        "SentEval 'label sentence'; trec: 'COARSE:fine question' (coarse "
                        "labels); auto: guessed from the first line (default)")
    p.add_argument("--classifier", choices=["logreg", "mlp", "bilstm"], default="logreg",
                   help="logreg / mlp on one pooled vector per sentence (--features); bilstm: "
                        "words + casing + a trainable scalar mix of the 3 frozen ELMo layers -> "
                        "BiLSTM -> max-pool -> linear (the paper's way; --features elmo only)")
    p.add_argument("--features", choices=["elmo", "layer0", "tfidf", "tfidf+elmo"],
                   default="elmo",
                   help="elmo: tokens' mean of the 3 layers, mean-pooled; layer0: context-free "
                        "char-CNN vector, mean-pooled; tfidf: bag-of-ngrams baseline; "
                        "tfidf+elmo: both, side by side")
    p.add_argument("--no-elmo", action="store_true",
                   help="bilstm: the same model without ELMo (words + casing only)")
    p.add_argument("--epochs", type=int, default=10, help="bilstm: at most this many epochs")
    p.add_argument("--patience", type=int, default=3,
                   help="bilstm: stop after this many epochs without a dev gain")
    p.add_argument("--hidden", type=int, default=100, help="bilstm: LSTM units per direction")
    p.add_argument("--lr", type=float, default=5e-3,
                   help="bilstm: Adam learning rate (default 5e-3, as elmo ner)")
    p.add_argument("--predictions", default=None, help="write text, gold, predicted to this TSV")
    p.add_argument("--max-train", type=int, default=None, help="random subsample of train")
    p.add_argument("--max-test", type=int, default=None, help="random subsample of test")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per biLM batch")
    p.add_argument("--device", default=None, help="cpu (default), cuda")
    p.add_argument("--seed", type=int, default=0)


def _ner_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model dir (options.json + weights.hdf5)")
    p.add_argument("--train", required=True, help="CoNLL-2003 file (eng.train)")
    p.add_argument("--dev", required=True, help="CoNLL-2003 file for early stopping (eng.testa)")
    p.add_argument("--test", required=True, help="CoNLL-2003 file to score (eng.testb)")
    p.add_argument("--no-elmo", action="store_true", help="the same tagger without ELMo")
    p.add_argument("--epochs", type=int, default=10, help="at most this many epochs")
    p.add_argument("--patience", type=int, default=3, help="epochs without dev F1 gain")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default 5e-3)")
    p.add_argument("--hidden", type=int, default=100, help="BiLSTM units per direction")
    p.add_argument("--max-train", type=int, default=None, help="random subsample of train sentences")
    p.add_argument("--max-eval", type=int, default=None,
                   help="random subsample of dev and test sentences (quick runs only)")
    p.add_argument("--predictions", default=None, help="write test with gold + predicted columns")
    p.add_argument("--device", default=None, help="cpu (default), cuda")
    p.add_argument("--seed", type=int, default=0)


def _quickstart_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work-dir", default="runs/quickstart",
                   help="where the corpus files, the run and the exported model go")
    p.add_argument("--minutes", type=float, default=5.0, help="training budget (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ============================================================================ shared by handlers
def one_line_warnings(command: str):
    """Show warnings as `elmo <command>: warning: ...` single lines on stderr."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"elmo {command}: warning: {message}", file=sys.stderr, flush=True)
    return show


@contextmanager
def warnings_as_lines(command: str) -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = one_line_warnings(command)
        yield


def at_least(flag: str, value, minimum) -> None:
    if value is not None and value < minimum:
        raise ElmoError(f"{flag} must be >= {minimum}, got {value}")


# ============================================================================ handlers
def cmd_vocab(args) -> int:
    from .outputs import check_output
    from .textio import BadLines, expand_glob, name_files
    from .vocab import build_vocabulary, count_words
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


def argv_from_args(args, add_flags: Callable, drop: tuple = ("nproc",)) -> list[str]:
    """The command-line arguments that give `args` under the parser `add_flags` builds (flags at
    their default left out): `--nproc N` re-runs the command under torchrun with them."""
    p = argparse.ArgumentParser(add_help=False)
    add_flags(p)
    out = []
    for a in p._actions:
        if not a.option_strings or a.dest in drop:
            continue
        v = getattr(args, a.dest, a.default)
        if v == a.default:
            continue
        if isinstance(a, argparse._StoreTrueAction):
            out.append(a.option_strings[0])
        else:
            out += [a.option_strings[0], str(v)]
    return out


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
    from . import checkpoint as ck
    from . import distributed, train
    from .textio import expand_glob
    from .vocab import Vocabulary
    nproc = getattr(args, "nproc", None)
    at_least("--nproc", nproc, 1)
    if nproc is not None and nproc > 1:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ElmoError("--nproc inside torchrun: use one or the other")
        return distributed.spawn_torchrun(nproc, "train", argv_from_args(args, _train_parser))
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
                        bf16=args.bf16, progress=not args.no_progress, vocab_path=args.vocab,
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
    from .checkpoint import load_language_model, same_vocabulary
    from .data import LMBatchStream
    from .evaluate import perplexity
    from .textio import expand_glob
    from .vocab import Vocabulary
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
    from .checkpoint import export_run
    from .outputs import check_output
    check_output(args.out, "--out", directory=True)
    options_file, weight_file = export_run(args.save_dir, args.out,
                                           safetensors=getattr(args, "safetensors", False))
    print(f"wrote {options_file} and {weight_file}")
    return 0


def cmd_embed(args) -> int:
    """The model is `--model`, or allennlp's `--options-file` + `--weight-file`;
    `--use-sentence-keys` and `--forget-sentences` as allennlp's `elmo` command."""
    from .embed import DEFAULT_STATE, ElmoEmbedder, check_state
    from .hub import resolve_model
    from .outputs import check_output
    model = getattr(args, "model", None)
    options_file = getattr(args, "options_file", None)
    weight_file = getattr(args, "weight_file", None)
    if model is not None and (options_file or weight_file):
        raise ElmoError("give --model or --options-file + --weight-file, not both")
    if model is None and not (options_file and weight_file):
        raise ElmoError("give --model, or both --options-file and --weight-file")
    at_least("--batch-size", args.batch_size, 1)
    at_least("--max-tokens", args.max_tokens, 0)
    nproc = getattr(args, "nproc", None)
    at_least("--nproc", nproc, 1)
    if nproc is not None and nproc > 1:
        from . import distributed
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ElmoError("--nproc inside torchrun: use one or the other")
        check_output(args.output, "--output", [args.input, options_file, weight_file])
        return distributed.spawn_torchrun(nproc, "embed", argv_from_args(args, _embed_parser))
    if not os.path.isfile(args.input):
        raise ElmoError(f"--input {args.input}: " + ("is a directory, expected a text file"
                        if os.path.isdir(args.input) else "input file not found"))
    check_output(args.output, "--output", [args.input, options_file, weight_file])
    state = check_state(args.state or DEFAULT_STATE)
    from . import distributed
    from .embed import embed_file, embed_file_distributed
    device = resolve_device(args.device)
    rank, world_size, device = distributed.init_distributed(
        device, getattr(args, "dist_timeout", None) or 600.0)
    if world_size > 1:
        distributed.on_sigterm_say_why(rank, "embed")
        if device.type == "cpu":          # the cores are shared between this machine's ranks
            import torch
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    files = resolve_model(model) if model is not None else (options_file, weight_file)
    embedder = ElmoEmbedder(*files, state=state, device=device, max_batch_size=args.batch_size)
    kw = dict(layers=args.layers, batch_size=args.batch_size,
              forget_sentences=getattr(args, "forget_sentences", False),
              use_sentence_keys=getattr(args, "use_sentence_keys", False), dtype=args.dtype,
              max_tokens=None if args.max_tokens == 0 else args.max_tokens,
              warn=lambda msg: print(f"elmo embed: warning: {msg}", file=sys.stderr),
              progress=False if args.no_progress else None)
    with warnings_as_lines("embed"):
        if world_size > 1:
            n = embed_file_distributed(embedder, args.input, args.output, rank, world_size, **kw)
        else:
            n = embed_file(embedder, args.input, args.output, **kw)
    if rank == 0:
        print(f"embedded {n} lines -> {args.output} ({args.layers}, {args.dtype}, state {state}"
              + (f", {world_size} processes" if world_size > 1 else "") + ")", file=sys.stderr)
    if world_size > 1:
        distributed.leave_group(rank, 0)
    return 0


def cmd_classify(args) -> int:
    from .embed import ElmoEmbedder
    from .hub import resolve_model
    from .outputs import check_output
    from .tasks import classify
    if args.predictions:
        check_output(args.predictions, "--predictions", [args.train, args.test, args.dev])
    for flag, value in (("--batch-size", args.batch_size), ("--max-train", args.max_train),
                        ("--max-test", args.max_test), ("--epochs", args.epochs),
                        ("--patience", args.patience), ("--hidden", args.hidden)):
        at_least(flag, value, 1)
    if not args.lr > 0:
        raise ElmoError(f"--lr must be > 0, got {args.lr}")
    bilstm = args.classifier == "bilstm"
    if args.no_elmo and not bilstm:
        raise ElmoError("--no-elmo is for --classifier bilstm (logreg / mlp without ELMo: "
                        "--features tfidf)")
    if bilstm and args.features != "elmo":
        raise ElmoError(f"--classifier bilstm reads the words (+ ELMo layers, or none with "
                        f"--no-elmo), not pooled features: --features {args.features} is for "
                        f"logreg / mlp")
    features = "words" if args.no_elmo else args.features
    needs_device = bilstm or features != "tfidf"
    device = resolve_device(args.device, default="cpu") if needs_device else None
    with warnings_as_lines("classify"):
        train, test, dev = classify.read_classification_data(
            args.train, args.test, args.dev, args.format, args.max_train, args.max_test, args.seed)
        embedder = None
        if features not in ("tfidf", "words"):
            if args.model is None:
                raise ElmoError("--model is required (a dir with options.json + weights.hdf5)"
                                + ("; --no-elmo: the BiLSTM without ELMo" if bilstm else ""))
            embedder = ElmoEmbedder(*resolve_model(args.model), device=device)
        elif args.no_elmo and args.model:
            print("--no-elmo: --model is ignored")
        result = classify.run_classification(
            train, test, dev, features, args.classifier, embedder, batch_size=args.batch_size,
            seed=args.seed, progress=True,
            bilstm=dict(epochs=args.epochs, patience=args.patience, hidden=args.hidden,
                        lr=args.lr, device=device) if bilstm else None)
    print(classify.classification_summary(result, features, args.classifier))
    if args.predictions:
        classify.write_predictions(args.predictions, test, result["predictions"])
        print(f"predictions written to {args.predictions}")
    return 0


def cmd_ner(args) -> int:
    import torch

    from .embed import ElmoEmbedder
    from .hub import resolve_model
    from .outputs import check_output
    from .tasks import ner
    if args.predictions:
        check_output(args.predictions, "--predictions", [args.train, args.dev, args.test])
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--hidden", args.hidden), ("--patience", args.patience),
                        ("--max-train", args.max_train), ("--max-eval", args.max_eval)):
        at_least(flag, value, 1)
    device = resolve_device(getattr(args, "device", None), default="cpu")
    with warnings_as_lines("ner"):
        train, dev, test = ner.read_ner_data(args.train, args.dev, args.test, args.max_train,
                                             args.max_eval, args.seed)
        embedder = None
        if not args.no_elmo:
            if args.model is None:
                raise ElmoError("--model is required (a dir with options.json + weights.hdf5)")
            embedder = ElmoEmbedder(*resolve_model(args.model), device=device)
        elif args.model:
            print("--no-elmo: --model is ignored")
        print(f"train {len(train)}  dev {len(dev)}  test {len(test)} sentences; "
              f"{'ELMo (frozen, scalar mix) + ' if embedder else ''}words + casing -> BiLSTM "
              f"({args.hidden}) -> CRF on {device}; {torch.get_num_threads()} torch threads")
        res = ner.train_tagger(train, dev, test, embedder, epochs=args.epochs,
                               patience=args.patience, batch_size=args.batch_size, lr=args.lr,
                               hidden=args.hidden, seed=args.seed, device=device)
    print(ner.ner_summary(res, embedder is not None))
    if args.predictions:
        ner.write_conll(test, args.predictions, extra=res.test_predictions, bio=True)
        print(f"predictions written to {args.predictions} (last column; tags in BIO)")
    return 0


def cmd_quickstart(args) -> int:
    from . import quickstart
    at_least("--minutes", args.minutes, 0.1)
    return quickstart.run_quickstart(args.work_dir, args.minutes, args.seed,
                                     progress=not args.no_progress)


COMMANDS = {
    "vocab": ("build a frequency-sorted vocabulary from a corpus", _vocab_parser, cmd_vocab),
    "train": ("train a biLM (bilm-tf train_elmo.py / restart.py)", _train_parser, cmd_train),
    "test": ("held-out perplexity with the full softmax (bilm-tf run_test.py)", _test_parser,
             cmd_test),
    "export": ("write options.json + weights.hdf5 from a run (bilm-tf dump_weights.py)",
               _export_parser, cmd_export),
    "embed": ("embed a text file to HDF5 (the removed `allennlp elmo` command)", _embed_parser,
              cmd_embed),
    "classify": ("text classification with ELMo (pooled vectors or a BiLSTM)", _classify_parser,
                 cmd_classify),
    "ner": ("CoNLL-2003 NER: ELMo -> BiLSTM -> CRF", _ner_parser, cmd_ner),
    "quickstart": ("train a small ELMo on a bundled corpus and show what it does",
                   _quickstart_parser, cmd_quickstart),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elmo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for name, (help_, _, _) in COMMANDS.items():
        sub.add_parser(name, help=help_, description=help_)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] in COMMANDS:
        name = argv[0]
        help_, add_flags, run = COMMANDS[name]
        p = argparse.ArgumentParser(prog=f"elmo {name}", description=help_)
        add_flags(p)
        args = p.parse_args(argv[1:])
        try:
            return run(args) or 0
        except ElmoError as e:
            print(f"elmo {name}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"elmo {name}: interrupted", file=sys.stderr)
            return 130
    parser.parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
