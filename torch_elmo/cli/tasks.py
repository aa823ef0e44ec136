"""`elmo classify` and `elmo ner`: the downstream tasks, trained and scored on labelled files."""
from __future__ import annotations

import argparse
import os

from ..config import ElmoError
from ..device import resolve_device
from .common import add_progress_flags, at_least, warnings_as_lines


def add_classify_flags(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--save", default=None, metavar="DIR",
                   help="save the trained model to this directory (task.json, the head, a copy "
                        "of the biLM), written atomically, for `elmo predict --model DIR` and "
                        "torch_elmo.load_task(DIR)")
    p.add_argument("--max-train", type=int, default=None, help="random subsample of train")
    p.add_argument("--max-test", type=int, default=None, help="random subsample of test")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per biLM batch")
    p.add_argument("--device", default=None, help="cpu (default), cuda")
    p.add_argument("--seed", type=int, default=0)
    add_progress_flags(p)


def add_ner_flags(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--save", default=None, metavar="DIR",
                   help="save the trained model to this directory (task.json, the head, a copy "
                        "of the biLM), written atomically, for `elmo predict --model DIR` and "
                        "torch_elmo.load_task(DIR)")
    p.add_argument("--device", default=None, help="cpu (default), cuda")
    p.add_argument("--seed", type=int, default=0)
    add_progress_flags(p)


def check_save(args, inputs: list) -> None:
    """--save DIR may be written (before any training): not an input, nor holding one."""
    if args.save:
        from ..tasks.saved import check_save_dir
        model = args.model if args.model and os.path.exists(args.model) else None
        check_save_dir(args.save, "--save", [*inputs, model, args.predictions])


def cmd_classify(args) -> int:
    from ..embed import ElmoEmbedder
    from ..hub import resolve_model
    from ..outputs import check_output
    from ..tasks import classify
    if args.predictions:
        check_output(args.predictions, "--predictions", [args.train, args.test, args.dev])
    check_save(args, [args.train, args.test, args.dev])
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
    if args.save:
        classify.save_classifier(result, args.save, features, args.classifier, embedder,
                                 options=vars(args))
        print(f"model saved to {args.save} (elmo predict --model {args.save})")
    return 0


def cmd_ner(args) -> int:
    import torch

    from ..embed import ElmoEmbedder
    from ..hub import resolve_model
    from ..outputs import check_output
    from ..tasks import ner
    if args.predictions:
        check_output(args.predictions, "--predictions", [args.train, args.dev, args.test])
    check_save(args, [args.train, args.dev, args.test])
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
    if args.save:
        ner.save_tagger(res, args.save, embedder, options=vars(args))
        print(f"model saved to {args.save} (elmo predict --model {args.save})")
    return 0


COMMANDS = {
    "classify": ("text classification with ELMo (pooled vectors or a BiLSTM)", add_classify_flags,
                 cmd_classify),
    "ner": ("CoNLL-2003 NER: ELMo -> BiLSTM -> CRF", add_ner_flags, cmd_ner),
}
