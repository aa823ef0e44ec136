"""README "Use it from ..." snippets, run as written (a tiny random model in place of the
pretrained one, a CoNLL-2003 slice, one epoch). Keep each string identical to its README block:
only the replacements listed beside it are applied, and each must still match."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import shared_path
from test_hub_hf import add_snapshot, offline_env, set_ref
from torch_elmo import BiLM, export_model, preset

SKLEARN = '''\
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from torch_elmo.sklearn import ElmoVectorizer

texts = ["a great movie", "an awful film", "great acting , great plot", "awful , just awful",
         "I loved it", "I hated it", "what a great cast", "a dull and awful script"]
labels = [1, 0, 1, 0, 1, 0, 1, 0]

clf = make_pipeline(ElmoVectorizer(model="small", layers="all", pooling="mean"),
                    LogisticRegression(max_iter=1000))
print(cross_val_score(clf, texts, labels, cv=2))
search = GridSearchCV(clf, {"elmovectorizer__pooling": ["mean", "max"]}, cv=2).fit(texts, labels)
print(search.best_params_, search.predict(["a great film"]))
'''

FLAIR = '''\
from flair.datasets import ColumnCorpus
from flair.models import SequenceTagger
from flair.trainers import ModelTrainer
from torch_elmo.flair import ElmoEmbeddings

corpus = ColumnCorpus("conll2003/", {0: "text", 3: "ner"}, train_file="eng.train",
                      dev_file="eng.testa", test_file="eng.testb")
tagger = SequenceTagger(hidden_size=256, embeddings=ElmoEmbeddings("small", layers="all"),
                        tag_dictionary=corpus.make_label_dictionary("ner", add_unk=False),
                        tag_type="ner")
ModelTrainer(tagger, corpus).train("runs/ner", max_epochs=10)
tagger = SequenceTagger.load("runs/ner/final-model.pt")  # needs `import torch_elmo.flair`
'''

HUB = '''\
import torch_elmo

elmo = torch_elmo.load("hf://your-name/elmo-small@v1")        # a tag, branch or commit hash
out = elmo(["Nothing suits me like a suit"])
embedder = torch_elmo.ElmoEmbedder("hf://your-name/elmo-small")  # the main branch
print(out["elmo"].shape, embedder.embed_sentence(["a", "suit"]).shape)
'''

SAFETENSORS = '''\
import torch_elmo

elmo = torch_elmo.load("small")
torch_elmo.export_model(elmo.bilm, "my-elmo", safetensors=True)
# my-elmo/ now holds options.json, weights.hdf5 and weights.safetensors (the same arrays); a
# folder (or a Hub repository) with options.json + weights.safetensors alone loads as well
again = torch_elmo.load("my-elmo")
'''


ENCODE = '''\
import torch_elmo

vectors = torch_elmo.load("model/").encode(["a first sentence", "another one"], batch_size=32,
                                           pooling="mean", layers="average")   # (2, 2P) numpy
'''


USE_SHELL = """\
elmo ner --model model/ --train eng.train --dev eng.testa --test eng.testb --save ner-model/
elmo classify --model model/ --train train.tsv --test test.tsv --classifier bilstm --save sst-model/
elmo predict --model ner-model/ --input news.txt --output entities.jsonl
elmo predict --model ner-model/ --input eng.testb --output tagged.conll --format conll
elmo predict --model sst-model/ --input reviews.txt --output - --format tsv
"""

USE_PYTHON = '''\
import torch_elmo

tagger = torch_elmo.load_task("ner-model/")
for doc in tagger.predict(["John Smith flew to Paris on Monday ."]):
    print([(e["text"], e["label"], e["start_char"], e["end_char"]) for e in doc["entities"]])

classifier = torch_elmo.load_task("sst-model/")
print(classifier.predict(["a gripping , funny film"]), classifier.classes_)
print(classifier.predict_proba(["a gripping , funny film", "dull"]))   # (2, n_labels) numpy
'''

USE_SPACY = '''\
import spacy

nlp = spacy.blank("en")
nlp.add_pipe("torch_elmo", config={"model": "model/", "layers": "average"})   # doc.tensor
nlp.add_pipe("torch_elmo_ner", config={"model": "ner-model/"})                # doc.ents
doc = nlp("John Smith flew to Paris on Monday.")
print([(e.text, e.label_) for e in doc.ents], doc[0].vector.shape)
docs = list(nlp.pipe(["A first text.", "A second one."], batch_size=64))      # batched
nlp.to_disk("ner-pipeline")                     # spacy.load("ner-pipeline") rebuilds it
'''

SERVE = '''\
elmo serve --model small --task ner=ner-model/ --port 8080
'''

SERVE_CURL = '''\
curl -s http://127.0.0.1:8080/v1/embeddings -H 'Content-Type: application/json' \\
     -d '{"input": ["Nothing suits me like a suit", "A second text"]}'
curl -s http://127.0.0.1:8080/v1/tasks/ner/predict -H 'Content-Type: application/json' \\
     -d '{"input": ["Alice met Bob in Paris"]}'
'''

SERVE_HTTPX = '''\
import io

import httpx
import numpy as np

r = httpx.post("http://127.0.0.1:8080/v1/embed", headers={"Accept": "application/x-npy"},
               json={"input": ["Nothing suits me like a suit", "A b"], "layers": "all"})
vectors = np.load(io.BytesIO(r.content))           # (2, 3, 6, 2P), zero-padded
lengths = [int(n) for n in r.headers["X-Elmo-Lengths"].split(",")]    # [6, 2]
'''

SERVE_OPENAI = '''\
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")   # or your --api-key
out = client.embeddings.create(model="elmo", input=["Nothing suits me like a suit"])
vector = out.data[0].embedding           # == torch_elmo.load("small").encode([...])[0]
'''


def _replaced(code: str, replacements: dict) -> str:
    for old, new in replacements.items():
        assert old in code, f"the snippet no longer contains {old!r}"
        code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(1234)
    out = tmp_path_factory.mktemp("tiny")
    export_model(BiLM(preset("tiny")).eval(), out, safetensors=True)
    return out


def _run_here(code: str, cwd) -> None:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(code, "<README snippet>", "exec"), {"__name__": "__snippet__"})
    finally:
        os.chdir(old)


def test_sklearn_snippet(tiny_dir, tmp_path, capsys):
    pytest.importorskip("sklearn")
    _run_here(_replaced(SKLEARN, {'"small"': repr(str(tiny_dir))}), tmp_path)
    assert "elmovectorizer__pooling" in capsys.readouterr().out


def test_flair_snippet(tiny_dir, tmp_path):
    pytest.importorskip("flair")
    from test_flair import conll_slice
    conll = shared_path("data", "conll2003")
    (tmp_path / "conll2003").mkdir()
    for name, n in (("eng.train", 40), ("eng.testa", 10), ("eng.testb", 10)):
        conll_slice(conll / name, tmp_path / "conll2003" / name, n)
    _run_here(_replaced(FLAIR, {'"small"': repr(str(tiny_dir)), "hidden_size=256": "hidden_size=8",
                                "max_epochs=10": "max_epochs=1"}), tmp_path)
    assert (tmp_path / "runs" / "ner" / "final-model.pt").is_file()


def test_hub_snippet(tiny_dir, tmp_path):
    pytest.importorskip("huggingface_hub")
    repo = tmp_path / "home" / "hub" / "models--your-name--elmo-small"
    only_hdf5 = tmp_path / "m"
    only_hdf5.mkdir()
    for name in ("options.json", "weights.hdf5"):
        (only_hdf5 / name).write_bytes((tiny_dir / name).read_bytes())
    add_snapshot(repo, "c" * 40, only_hdf5)
    set_ref(repo, "main", "c" * 40)
    set_ref(repo, "v1", "c" * 40)
    proc = subprocess.run([sys.executable, "-c", HUB], env=offline_env(tmp_path / "home"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.Size([1, 6, 32]) (3, 2, 32)" in proc.stdout


def test_safetensors_snippet(tiny_dir, tmp_path):
    pytest.importorskip("safetensors")
    _run_here(_replaced(SAFETENSORS, {'"small"': repr(str(tiny_dir))}), tmp_path)
    assert sorted(p.name for p in (tmp_path / "my-elmo").iterdir()) == \
        ["options.json", "weights.hdf5", "weights.safetensors"]


def test_import_torch_elmo_imports_no_optional_package():
    code = textwrap.dedent("""
        import sys, torch_elmo, torch_elmo.hub, torch_elmo.export, torch_elmo.cli
        print(sorted(m for m in ("sklearn", "flair", "huggingface_hub", "safetensors", "fastapi",
                                 "starlette", "uvicorn", "prometheus_client", "openai")
                     if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"


def test_encode_snippet_matches_the_readme(tiny_dir, tmp_path):
    from conftest import REPO
    assert ENCODE in (REPO / "README.md").read_text()
    scope = {"__name__": "__snippet__"}
    exec(compile(_replaced(ENCODE, {'"model/"': repr(str(tiny_dir))}), "<README>", "exec"), scope)
    assert scope["vectors"].shape == (2, 32)



def test_use_your_trained_model_snippets(tiny_dir, tmp_path, capsys):
    """README "Use your trained model": the shell block (tiny model, a CoNLL slice, 1 epoch), then
    the Python block on the models it saved."""
    import shlex

    from conftest import REPO
    from test_flair import conll_slice
    readme = (REPO / "README.md").read_text()
    assert USE_SHELL in readme and USE_PYTHON in readme
    conll = shared_path("data", "conll2003")
    for name, n in (("eng.train", 40), ("eng.testa", 10), ("eng.testb", 10)):
        conll_slice(conll / name, tmp_path / name, n)
    rows = [("a gripping , funny film", "pos"), ("dull and slow", "neg"), ("a fine cast", "pos"),
            ("awful , just awful", "neg")] * 3
    for name in ("train.tsv", "test.tsv"):
        (tmp_path / name).write_text("".join(f"{t}\t{l}\n" for t, l in rows))
    (tmp_path / "news.txt").write_text("John Smith flew to Paris on Monday .\n\nEU rejects it .\n")
    (tmp_path / "reviews.txt").write_text("a gripping , funny film\ndull\n")
    outputs = []
    for line in _replaced(USE_SHELL, {"model/ --train": f"{tiny_dir} --train"}).splitlines():
        argv = shlex.split(line)
        if argv[1] in ("ner", "classify"):
            argv += ["--epochs", "1"]
        proc = subprocess.run([sys.executable, "-m", "torch_elmo", *argv[1:]], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
        outputs.append(proc.stdout)
    records = [json.loads(l) for l in (tmp_path / "entities.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in records] == [
        "John Smith flew to Paris on Monday .".split(), [], "EU rejects it .".split()]
    tagged = (tmp_path / "tagged.conll").read_text().split("\n\n")
    assert tagged[0].splitlines()[0].split()[0] == (tmp_path / "eng.testb").read_text().split()[0]
    assert [l.split("\t")[0] for l in outputs[-1].splitlines()] == ["a gripping , funny film",
                                                                    "dull"]
    _run_here(USE_PYTHON, tmp_path)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("[")                        # the entities of the first text
    assert printed[1].startswith("[") and "neg" in printed[1] and "pos" in printed[1]
    assert len(printed) == 4                                 # label + classes, then 2 rows

    # spaCy, in a fresh process (the components come from the entry points, not an import)
    assert USE_SPACY in readme
    proc = subprocess.run([sys.executable, "-c", _replaced(USE_SPACY, {'"model/"': repr(str(tiny_dir))})],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("(32,)")             # token vectors of the tiny model
    assert (tmp_path / "ner-pipeline" / "config.cfg").is_file()
def test_serve_snippets_run_against_the_readme_command(tiny_dir, tmp_path):
    for module in ("fastapi", "uvicorn", "httpx", "openai", "skops"):
        pytest.importorskip(module)
    import numpy as np

    from conftest import REPO
    from test_serve import Server, free_port, saved_tagger
    from torch_elmo import load
    readme = (REPO / "README.md").read_text()
    for snippet in (SERVE, SERVE_CURL, SERVE_HTTPX, SERVE_OPENAI):
        assert snippet in readme
    saved_tagger(tiny_dir, tmp_path / "ner-model")
    port = str(free_port())
    argv = shlex.split(_replaced(SERVE, {"small": str(tiny_dir), "8080": port,
                                         "ner=ner-model/": f"ner={tmp_path / 'ner-model'}/"}))
    assert argv[:2] == ["elmo", "serve"]
    server = Server(None, tmp_path / "server.log", port=int(port), argv=argv[1:])
    try:
        if shutil.which("curl"):
            out = subprocess.run(["bash", "-c", _replaced(SERVE_CURL, {"8080": port})],
                                 capture_output=True, text=True, timeout=60, check=True).stdout
            first, end = json.JSONDecoder().raw_decode(out)
            second = json.loads(out[end:])
            assert len(first["data"]) == 2 and first["usage"]["prompt_tokens"] == 9
            assert second["kind"] == "ner" and second["data"][0]["tokens"][0] == "Alice"
        scope = {"__name__": "__snippet__"}
        exec(compile(_replaced(SERVE_HTTPX, {"8080": port}), "<README>", "exec"), scope)
        assert scope["vectors"].shape == (2, 3, 6, 32) and scope["lengths"] == [6, 2]
        exec(compile(_replaced(SERVE_OPENAI, {"8080": port}), "<README>", "exec"), scope)
        want = load(tiny_dir).encode(["Nothing suits me like a suit"])[0]
        assert np.abs(np.array(scope["vector"], dtype=np.float32) - want).max() < 1e-6
    finally:
        assert server.stop(signal.SIGINT) == 0, server.log()[-3000:]      # Ctrl-C drains too
