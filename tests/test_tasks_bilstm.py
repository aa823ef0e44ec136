"""tasks/bilstm.py: the BiLSTM classifier (words + casing [+ scalar mix of the frozen ELMo
layers] -> BiLSTM -> max-pool -> linear) on a separable toy set, seeded determinism, padding that
never reaches the max-pool, dev / no-dev epochs. A tiny random biLM; seconds."""
import numpy as np
import torch

from torch_elmo.tasks import bilstm, classify

from test_tasks_classify import separable_examples
from test_tasks_common import embedder  # noqa: F401 (a fixture)

QUICK = dict(epochs=10, patience=3, hidden=32, lr=1e-2)


def test_bilstm_learns_separable_set_with_and_without_elmo(embedder):
    train, test = separable_examples(80, 0), separable_examples(40, 1)
    dev = separable_examples(20, 2)
    with_elmo = classify.run_classification(train, test, dev, "elmo", "bilstm", embedder,
                                            bilstm=QUICK)
    words_only = classify.run_classification(train, test, dev, "words", "bilstm", bilstm=QUICK)
    for r in (with_elmo, words_only):
        assert r["accuracy"] >= 0.95 and r["macro_f1"] >= 0.95, r["accuracy"]
        assert set(r["per_class_f1"]) == {"fruit", "tool"} and len(r["predictions"]) == 40
        assert r["reg"] is None and r["n_dev"] == 20 and 1 <= r["best_epoch"] <= r["epochs_run"]
        assert set(r["dev_scores"]) == set(range(1, r["epochs_run"] + 1))
    # input per token: word 100 + casing 8 (+ 2P ELMo)
    assert words_only["dim"] == 108 and not words_only["elmo"] and words_only["mix"] == ""
    assert with_elmo["dim"] == 108 + 2 * embedder.model.proj_dim and with_elmo["elmo"]
    assert with_elmo["mix"].startswith("mix s=[")
    text = classify.classification_summary(with_elmo, "elmo", "bilstm")
    assert "scalar mix" in text and "kept" in text and "accuracy" in text


def test_bilstm_is_deterministic_with_a_seed(embedder):
    train, test = separable_examples(40, 0), separable_examples(20, 1)
    dev = separable_examples(10, 2)
    layers = classify.split_layers(embedder, {"train": train, "test": test, "dev": dev}, 64,
                                   None, False)
    runs = [bilstm.train_bilstm_classifier(train, test, dev, layers=layers, seed=s, epochs=3,
                                           hidden=16, lr=1e-2) for s in (0, 0, 1)]
    losses = [[h["loss"] for h in r["history"]] for r in runs]
    assert losses[0] == losses[1] and runs[0]["predictions"] == runs[1]["predictions"]
    assert losses[0] != losses[2]


def test_max_pool_never_sees_padding():
    torch.manual_seed(0)
    model = bilstm.BiLSTMClassifier(n_words=10, n_labels=3, hidden=8).eval()
    words, cases = [[2, 3], [4, 5, 6, 7, 8]], [[5, 5], [4, 5, 5, 5, 6]]
    alone = bilstm.logits_of(model, bilstm.make_batch([0], words, cases, None), "cpu")
    padded = bilstm.logits_of(model, bilstm.make_batch([0, 1], words, cases, None), "cpu")
    assert torch.allclose(alone[0], padded[0], atol=1e-6)


def test_without_dev_all_epochs_run_and_the_last_is_kept():
    train, test = separable_examples(20, 0), separable_examples(10, 1)
    r = bilstm.train_bilstm_classifier(train, test, epochs=2, hidden=8)
    assert r["epochs_run"] == r["best_epoch"] == 2 and r["dev_scores"] == {} and r["n_dev"] == 0
    assert "no --dev" in classify.classification_summary(r, "words", "bilstm")


def test_the_layers_are_cached_once_per_split(embedder):
    train, test = separable_examples(20, 0), separable_examples(10, 1)
    cache = {}
    classify.run_classification(train, test, None, "elmo", "bilstm", embedder,
                                feature_cache=cache, bilstm=dict(epochs=1, hidden=8))
    layers = cache[("layers", "train", id(train))]
    assert len(layers) == 20 and layers[0].dtype == np.float16
    assert layers[0].shape == (3, 4, 2 * embedder.model.proj_dim)
