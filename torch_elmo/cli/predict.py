"""`elmo predict`: a saved task model (`elmo ner --save DIR`, `elmo classify --save DIR`) applied
to a file of any size, streamed in chunks, one output record per input text in input order.

Input (`--input-format`): `text`, one text per line (split on whitespace; an empty line is an
empty text); or `conll` (a tagger only), one token per line in the first column, a blank line
after each sentence, `-DOCSTART-` lines dropped. `auto` (the default) reads CoNLL when the file
starts with -DOCSTART- or its first lines are columns ending in an NER tag (ner.looks_like_conll),
else text. Output (`--format`): `jsonl` (a tagger: the dict Tagger.predict returns; a classifier:
`{"text", "label", "probabilities": {label: p}}`, label and probabilities null for an empty
text), `conll` (a tagger: `token TAG` lines, a blank line after each text) or `tsv` (the tokens
joined by spaces, a tab, the label; a tagger: the tags joined by spaces). The output file is
written atomically (`-`: stdout) and is never the input; progress (bytes of input, with an
ETA) follows progress.py's policy: a bar on a terminal, a line now and then in a log.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from ..config import ElmoError
from .common import add_progress_flags, at_least, warnings_as_lines

FORMATS = ("jsonl", "conll", "tsv")
INPUT_FORMATS = ("auto", "text", "conll")


def add_predict_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a saved task model directory (elmo ner --save / elmo classify --save)")
    p.add_argument("--input", required=True,
                   help="text file, one text per line; or CoNLL for a tagger (token in the "
                        "first column, a blank line after each sentence)")
    p.add_argument("--output", required=True, help="output file (written atomically); - for stdout")
    p.add_argument("--format", choices=FORMATS, default="jsonl",
                   help="jsonl (default): one JSON object per text; conll (tagger): token and "
                        "tag per line; tsv: tokens<TAB>label (tagger: tokens<TAB>tags)")
    p.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                   help="auto (default): CoNLL when the file starts with -DOCSTART- or with "
                        "columns ending in an NER tag, else text")
    p.add_argument("--batch-size", type=int, default=64, help="texts per ELMo batch (default 64, as the training commands embed)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    add_progress_flags(p)


@contextmanager
def open_output(path: str) -> Iterator:
    """The output stream: stdout for `-`, else an atomically written file."""
    if path == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    from ..outputs import atomic_text
    with atomic_text(path) as f:
        yield f


def first_lines(path: str, n: int = 50) -> list[str]:
    from ..textio import iter_lines
    out = []
    for line, _ in iter_lines(path, warn=lambda m: None):
        out.append(line)
        if len(out) >= n:
            break
    return out


def records(path: str, input_format: str) -> Iterator[tuple[object, int]]:
    """(text or token list, bytes of input read) per record of the input."""
    from ..tasks.ner import iter_conll_tokens
    from ..textio import iter_lines
    lines = iter_lines(path)
    if input_format == "conll":
        yield from iter_conll_tokens(lines)
    else:
        for line, at in lines:
            yield line.rstrip("\r"), at


def chunked(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tagger_lines(results: list, fmt: str) -> Iterator[str]:
    for r in results:
        if fmt == "jsonl":
            yield json.dumps(r, ensure_ascii=False) + "\n"
        elif fmt == "tsv":
            yield " ".join(r["tokens"]) + "\t" + " ".join(r["tags"]) + "\n"
        else:
            yield "".join(f"{w} {t}\n" for w, t in zip(r["tokens"], r["tags"])) + "\n"


def classifier_lines(texts: list, labels: list, proba, classes: list, fmt: str) -> Iterator[str]:
    for text, label, row in zip(texts, labels, proba):
        tokens = text.split() if isinstance(text, str) else list(text)
        if fmt == "tsv":
            yield " ".join(tokens) + "\t" + (label or "") + "\n"
            continue
        probs = None if label is None else {c: float(p) for c, p in zip(classes, row)}
        yield json.dumps({"text": text if isinstance(text, str) else " ".join(text),
                          "label": label, "probabilities": probs}, ensure_ascii=False) + "\n"


def cmd_predict(args) -> int:
    from ..device import resolve_device
    from ..outputs import check_output
    from ..tasks.load import load_task
    from ..tasks.ner import looks_like_conll
    from ..progress import progress_bar
    from ..tasks.predictor import CHUNK_BATCHES
    at_least("--batch-size", args.batch_size, 1)
    if not os.path.isfile(args.input):
        raise ElmoError(f"--input {args.input}: " + ("is a directory, expected a text file"
                                                     if os.path.isdir(args.input)
                                                     else "no such file"))
    if args.output != "-":
        check_output(args.output, "--output", [args.input])
    with warnings_as_lines("predict"):
        model = load_task(args.model, resolve_device(args.device))
        input_format = args.input_format
        if input_format == "auto":
            input_format = "conll" if looks_like_conll(first_lines(args.input)) else "text"
        if model.kind == "classify":
            if input_format == "conll":
                raise ElmoError(f"{args.input}: CoNLL input (a token per line), but {args.model} "
                                f"is a text classifier: give one text per line (--input-format "
                                f"text if this is text)")
            if args.format == "conll":
                raise ElmoError(f"--format conll writes a tagger's tags; {args.model} is a text "
                                f"classifier: use --format jsonl or tsv")
        size = os.path.getsize(args.input)
        n = 0
        with open_output(args.output) as out, \
                progress_bar(size, desc="predict", unit="B", unit_scale=True, leave=False) as bar:
            for chunk in chunked(records(args.input, input_format),
                                 args.batch_size * CHUNK_BATCHES):
                texts = [t for t, _ in chunk]
                if model.kind == "ner":
                    lines = tagger_lines(model.predict(texts, args.batch_size), args.format)
                else:
                    labels, proba = model.scores(texts, args.batch_size, False, "predict")
                    lines = classifier_lines(texts, labels, proba, model.classes_, args.format)
                out.writelines(lines)
                n += len(texts)
                bar.update(chunk[-1][1] - bar.n)
                bar.set_postfix(texts=n, refresh=False)
    if args.output != "-":
        print(f"{n} {'texts' if input_format == 'text' else 'sentences'} -> {args.output} "
              f"({args.format})")
    return 0


COMMANDS = {
    "predict": ("tag or classify new text with a saved task model (elmo ner / classify --save)",
                add_predict_flags, cmd_predict),
}
