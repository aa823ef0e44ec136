"""flair: ElmoEmbeddings as a flair TokenEmbeddings; flair's own SequenceTagger + ModelTrainer train
one epoch on a CoNLL-2003 slice with a tiny random torch-elmo model, and the saved tagger loads."""
import importlib
import sys

import numpy as np
import pytest
import torch

from conftest import shared_path
from torch_elmo import BiLM, ElmoEmbedder, ElmoError, export_model, preset

flair = pytest.importorskip("flair")
from flair.data import Sentence  # noqa: E402

from torch_elmo.flair import ElmoEmbeddings  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(1234)
    out = tmp_path_factory.mktemp("tiny")
    export_model(BiLM(preset("tiny")).eval(), out)
    return str(out)


def conll_slice(src, dst, n):
    """The first n sentences of a CoNLL-2003 file, -DOCSTART- lines dropped."""
    sentences, rows = [], []
    for line in src.read_text().splitlines():
        if line.startswith("-DOCSTART-"):
            continue
        if line.strip():
            rows.append(line)
        elif rows:
            sentences.append(rows)
            rows = []
        if len(sentences) == n:
            break
    dst.write_text("".join("\n".join(s) + "\n\n" for s in sentences))


def test_token_vectors_are_the_embedders(model_dir):
    tokens = "EU rejects German call".split()
    layers = ElmoEmbedder(model_dir, device="cpu").embed_sentence(tokens)  # (3, n, 2P)
    for spec, want in (("all", layers.transpose(1, 0, 2).reshape(len(tokens), -1)),
                       ("average", layers.mean(0)), ("top", layers[-1]),
                       ([0, 2], np.concatenate([layers[0], layers[2]], axis=1))):
        emb = ElmoEmbeddings(model_dir, layers=spec)
        sentence = Sentence(" ".join(tokens))
        emb.embed(sentence)
        got = torch.stack([t.get_embedding() for t in sentence]).cpu().numpy()
        assert got.shape == (len(tokens), emb.embedding_length) == want.shape, spec
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=str(spec))
    with pytest.raises(ElmoError, match="layers must be one of"):
        ElmoEmbeddings(model_dir, layers="bottom")


def test_sequence_tagger_trains_one_epoch_on_conll(model_dir, tmp_path):
    from flair.datasets import ColumnCorpus
    from flair.models import SequenceTagger
    from flair.trainers import ModelTrainer
    conll = shared_path("data", "conll2003")
    data = tmp_path / "data"
    data.mkdir()
    for name, n in (("eng.train", 50), ("eng.testa", 20), ("eng.testb", 20)):
        conll_slice(conll / name, data / f"{name}.txt", n)
    corpus = ColumnCorpus(data, {0: "text", 3: "ner"}, train_file="eng.train.txt",
                          dev_file="eng.testa.txt", test_file="eng.testb.txt")
    assert len(corpus.train) == 50
    tagger = SequenceTagger(hidden_size=8, embeddings=ElmoEmbeddings(model_dir),
                            tag_dictionary=corpus.make_label_dictionary("ner", add_unk=False),
                            tag_type="ner", use_crf=False)
    result = ModelTrainer(tagger, corpus).train(tmp_path / "run", max_epochs=1,
                                                mini_batch_size=16, create_file_logs=False)
    assert 0.0 <= result["test_score"] <= 1.0
    # the saved tagger holds the biLM's options + weights: it loads without the model dir
    loaded = SequenceTagger.load(tmp_path / "run" / "final-model.pt")
    a, b = Sentence("EU rejects German call"), Sentence("EU rejects German call")
    tagger.embeddings.embed(a)
    loaded.embeddings.embed(b)
    for x, y in zip(a, b):
        assert torch.equal(x.get_embedding().cpu(), y.get_embedding().cpu())


def test_missing_flair_is_one_line(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_elmo.flair")
    for name in [m for m in sys.modules if m == "flair" or m.startswith("flair.")]:
        monkeypatch.setitem(sys.modules, name, None)  # what `import flair` meets uninstalled
    with pytest.raises(ElmoError, match=r"pip install 'torch-elmo\[flair\]'") as e:
        importlib.import_module("torch_elmo.flair")
    assert "\n" not in str(e.value)
