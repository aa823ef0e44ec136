"""Command line: `elmo <command>` (also `python -m torch_elmo <command>`).

This module owns the argument parsers and the error policy: a user error (ElmoError, a missing
file, bad input) prints ONE line `elmo <command>: error: ...` and exits 2, never a trace. Each
command's work lives in its stage module; the parser functions here are the only place flags are
defined, so `elmo <command> --help` is the reference.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from .config import ElmoError


def _vocab_parser(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("--train", required=True, help="glob of training files (quote it)")
    p.add_argument("--out", required=True, help="vocabulary file to write")
    p.add_argument("--min-count", type=int, default=1)
    p.add_argument("--max-size", type=int, default=None, help="including the 3 specials")
    from . import data
    return data.cli_vocab


def _train_parser(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("--train", required=True, help="glob of training files, one sentence per line")
    p.add_argument("--vocab", required=True)
    p.add_argument("--save-dir", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=["tiny", "small", "medium", "original"], default=None)
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
    p.add_argument("--learning-rate", type=float, default=None)
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
    from . import train
    return train.cli_train


def _test_parser(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("--test", required=True, help="glob of held-out files")
    p.add_argument("--vocab", required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--batch-size", type=int, default=256, help="rows per batch (unroll is 1)")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    from . import evaluate
    return evaluate.cli_test


def _export_parser(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("--save-dir", required=True, help="training run directory")
    p.add_argument("--out", required=True, help="directory for options.json + weights.hdf5")
    from . import train
    return train.cli_export


def _embed_parser(p: argparse.ArgumentParser) -> Callable:
    from . import embed
    p.add_argument("--model", required=True,
                   help="dir with options.json + weights.hdf5, or a pretrained name "
                        "(small, medium, original, original-5.5B; downloaded once, cached in "
                        "$TORCH_ELMO_CACHE or ~/.cache/torch_elmo)")
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
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")
    return embed.cli_embed


def _classify_parser(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("--model", default=None,
                   help="model dir (options.json + weights.hdf5); not needed for --features tfidf")
    p.add_argument("--train", required=True, help="training file")
    p.add_argument("--test", required=True, help="test file")
    p.add_argument("--dev", default=None, help="dev file: choose C (logreg) / alpha (mlp) on it")
    p.add_argument("--format", choices=["auto", "tsv", "emotion", "sst", "trec"], default="auto",
                   help="tsv: text<TAB>label; emotion: text;label (dair-ai); sst: SST-2 tsv or "
                        "SentEval 'label sentence'; trec: 'COARSE:fine question' (coarse "
                        "labels); auto: guessed from the first line (default)")
    p.add_argument("--classifier", choices=["logreg", "mlp"], default="logreg")
    p.add_argument("--features", choices=["elmo", "layer0", "tfidf"], default="elmo",
                   help="elmo: tokens' mean of the 3 layers, mean-pooled; layer0: context-free "
                        "char-CNN vector, mean-pooled; tfidf: bag-of-ngrams baseline")
    p.add_argument("--predictions", default=None, help="write text, gold, predicted to this TSV")
    p.add_argument("--max-train", type=int, default=None, help="random subsample of train")
    p.add_argument("--max-test", type=int, default=None, help="random subsample of test")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per biLM batch")
    p.add_argument("--device", default=None, help="cpu (default), cuda")
    p.add_argument("--seed", type=int, default=0)
    from . import tasks
    return tasks.cli_classify


def _ner_parser(p: argparse.ArgumentParser) -> Callable:
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
    p.add_argument("--seed", type=int, default=0)
    from . import tasks
    return tasks.cli_ner


def _quickstart_parser(p: argparse.ArgumentParser) -> Callable:
    p.add_argument("--work-dir", default="runs/quickstart",
                   help="where the corpus files, the run and the exported model go")
    p.add_argument("--minutes", type=float, default=5.0, help="training budget (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from . import quickstart
    return quickstart.cli_quickstart


COMMANDS = {
    "vocab": ("build a frequency-sorted vocabulary from a corpus", _vocab_parser),
    "train": ("train a biLM (bilm-tf train_elmo.py / restart.py)", _train_parser),
    "test": ("held-out perplexity with the full softmax (bilm-tf run_test.py)", _test_parser),
    "export": ("write options.json + weights.hdf5 from a run (bilm-tf dump_weights.py)",
               _export_parser),
    "embed": ("embed a text file to HDF5 (the removed `allennlp elmo` command)", _embed_parser),
    "classify": ("text classification on pooled ELMo vectors", _classify_parser),
    "ner": ("CoNLL-2003 NER: ELMo -> BiLSTM -> CRF", _ner_parser),
    "quickstart": ("train a small ELMo on a bundled corpus and show what it does", _quickstart_parser),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elmo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for name, (help_, _) in COMMANDS.items():
        sub.add_parser(name, help=help_, description=help_)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Only the chosen command's module is imported (torch-heavy modules load lazily).
    if argv and argv[0] in COMMANDS:
        name = argv[0]
        help_, add = COMMANDS[name]
        p = argparse.ArgumentParser(prog=f"elmo {name}", description=help_)
        run = add(p)
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
