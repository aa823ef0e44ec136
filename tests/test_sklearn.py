"""ElmoVectorizer: a scikit-learn transformer (Pipeline, cross_val_score, GridSearchCV, clone,
pickle), checked also with scikit-learn's own estimator checks."""
import atexit
import importlib
import pickle
import shutil
import sys
import tempfile

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from torch_elmo import BiLM, ElmoEmbedder, ElmoError, export_model, preset  # noqa: E402
from torch_elmo.sklearn import ElmoVectorizer  # noqa: E402

TEXTS = ["the cat sat on the mat", "a dog barked", "stocks fell sharply today",
         "the market rose", "my cat purrs", "", "dogs and cats", "bonds and stocks"]
LABELS = [0, 0, 1, 1, 0, 0, 0, 1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(1234)
    out = tmp_path_factory.mktemp("tiny")
    export_model(BiLM(preset("tiny")).eval(), out)
    return str(out)


def test_transform_shapes_layers_and_pooling(model_dir):
    ref = ElmoEmbedder(model_dir, device="cpu")
    layers = ref.embed_sentence(TEXTS[0].split())  # (3, n, 2P)
    n_layers, _, dim = layers.shape
    cases = {("all", "mean"): layers.transpose(1, 0, 2).reshape(6, -1).mean(0),
             ("average", "mean"): layers.mean(0).mean(0),
             ("top", "max"): layers[-1].max(0),
             (0, "first"): layers[0][0],
             ((1, 2), "last"): np.concatenate([layers[1][-1], layers[2][-1]]),
             ("average", "mean+max"): np.concatenate([layers.mean(0).mean(0), layers.mean(0).max(0)])}
    for (spec, pooling), want in cases.items():
        v = ElmoVectorizer(model=model_dir, layers=spec, pooling=pooling, device="cpu")
        X = v.fit_transform(TEXTS)
        assert X.dtype == np.float32 and X.shape == (len(TEXTS), v.n_features_out_) == \
            (len(TEXTS), want.shape[0]), (spec, pooling)
        np.testing.assert_allclose(X[0], want, atol=1e-6, err_msg=str((spec, pooling)))
        assert not X[5].any()  # the empty text
    assert n_layers == 3 and dim == 32


def test_batching_order_and_token_lists(model_dir):
    v = ElmoVectorizer(model=model_dir, batch_size=3, device="cpu").fit(TEXTS)
    X = v.transform(TEXTS)
    one = ElmoVectorizer(model=model_dir, batch_size=1, device="cpu").fit(TEXTS)
    np.testing.assert_allclose(X, one.transform(TEXTS), atol=1e-6)
    np.testing.assert_allclose(X[::-1], v.transform(TEXTS[::-1]), atol=1e-6)
    np.testing.assert_array_equal(X, v.transform([t.split() for t in TEXTS]))
    np.testing.assert_array_equal(X, v.transform(np.array(TEXTS, dtype=object)[:, None]))
    assert list(v.get_feature_names_out()[:2]) == ["elmo0", "elmo1"]


def test_errors_are_one_line(model_dir):
    with pytest.raises(NotFittedError):
        ElmoVectorizer(model=model_dir).transform(TEXTS)
    v = ElmoVectorizer(model=model_dir, device="cpu").fit(TEXTS)
    for bad, msg in (("one text", "got one string"), ([1, 2], "text 0: expected a string"),
                     ([["a", 3]], "text 0: expected a string")):
        with pytest.raises(ElmoError, match=msg):
            v.transform(bad)
    for params, msg in (({"pooling": "sum"}, "pooling must be one of"),
                        ({"layers": "bottom"}, "layers must be one of"),
                        ({"layers": 3}, "layer 3 out of range"),
                        ({"batch_size": 0}, "batch_size must be a positive int"),
                        ({"model": "/nowhere"}, "no such directory")):
        with pytest.raises(ElmoError, match=msg) as e:
            ElmoVectorizer(**{"model": model_dir, "device": "cpu", **params}).fit(TEXTS)
        assert "\n" not in str(e.value)


def test_pipeline_cross_val_score_and_grid_search(model_dir):
    pipe = make_pipeline(ElmoVectorizer(model=model_dir, device="cpu"),
                         LogisticRegression(max_iter=200))
    scores = cross_val_score(pipe, TEXTS, LABELS, cv=2)
    assert scores.shape == (2,) and np.all((0 <= scores) & (scores <= 1))
    grid = GridSearchCV(pipe, {"elmovectorizer__pooling": ["mean", "max"],
                               "elmovectorizer__layers": ["all", "top"]}, cv=2)
    grid.fit(TEXTS, LABELS)
    assert set(grid.best_params_) == {"elmovectorizer__pooling", "elmovectorizer__layers"}
    assert grid.predict(["a cat", "stocks"]).shape == (2,)


def test_cross_val_score_in_worker_processes(model_dir):
    # joblib's worker processes get the pickled pipeline: each reloads the biLM from model_dir
    pipe = make_pipeline(ElmoVectorizer(model=model_dir, device="cpu"),
                         LogisticRegression(max_iter=200))
    serial = cross_val_score(pipe, TEXTS, LABELS, cv=2)
    np.testing.assert_allclose(cross_val_score(pipe, TEXTS, LABELS, cv=2, n_jobs=2), serial)


def test_clone_and_pickle_hold_no_model(model_dir):
    v = ElmoVectorizer(model=model_dir, layers=[0, 2], pooling="max", device="cpu")
    assert clone(v).get_params() == v.get_params()
    X = v.fit_transform(TEXTS)
    fresh = clone(v)
    assert not hasattr(fresh, "n_features_out_")
    data = pickle.dumps(v)
    assert b"_rebuild_tensor" not in data and len(data) < 2000  # no tensors, no biLM
    again = pickle.loads(data)
    np.testing.assert_array_equal(again.transform(TEXTS), X)  # reloaded from model_dir
    pipe = make_pipeline(v, LogisticRegression(max_iter=200)).fit(TEXTS, LABELS)
    loaded = pickle.loads(pickle.dumps(pipe))
    np.testing.assert_array_equal(loaded.predict_proba(TEXTS), pipe.predict_proba(TEXTS))


def test_missing_sklearn_is_one_line(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_elmo.sklearn")
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.setitem(sys.modules, name, None)  # what `import sklearn` meets uninstalled
    with pytest.raises(ElmoError, match=r"pip install 'torch-elmo\[sklearn\]'") as e:
        importlib.import_module("torch_elmo.sklearn")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------- scikit-learn's estimator checks
class NumbersAsText(ElmoVectorizer):
    """The checks feed numeric (n, d) arrays: each row becomes a text of d number tokens, so the
    checks that are about the estimator API (fit returns self, idempotence, params not
    overwritten, pickling, sample-order and subset invariance, ...) run on real biLM output."""

    def fit(self, X=None, y=None):
        return super().fit(self._texts(X), y)

    def transform(self, X):
        return super().transform(self._texts(X))

    @staticmethod
    def _texts(X):
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"Expected 2D array, got {X.ndim}D array instead")
        if X.shape[0] == 0:
            raise ValueError(f"0 sample(s) (shape={X.shape}) while a minimum of 1 is required.")
        return [" ".join(f"{v:.2f}" for v in row) for row in X]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array, tags.input_tags.string = True, False
        return tags


# the checks that cannot apply to a text transformer, and why
EXPECTED_FAILED = {
    "check_n_features_in": "texts have no n_features_in_ (a text has any number of tokens)",
    "check_n_features_in_after_fitting": "texts have no n_features_in_",
    "check_transformer_general": "it wants an error for a different number of features in "
                                 "transform than in fit: texts have any number of tokens",
    "check_transformer_general(readonly_memmap=True)": "as check_transformer_general",
    "check_estimators_empty_data_messages": "an (n, 0) array is n empty texts: zero rows",
    "check_estimators_nan_inf": "'nan' and 'inf' are tokens like any other",
    "check_complex_data": "complex numbers are tokens like any other",
    "check_dtype_object": "object arrays are texts (the test adapter formats numbers only)",
    "check_fit2d_predict1d": "a 1-d list of texts is the normal input",
    "check_estimator_sparse_array": "texts are never sparse",
    "check_estimator_sparse_matrix": "texts are never sparse",
    "check_estimator_sparse_tag": "texts are never sparse",
    "check_transformer_preserve_dtypes": "rows are float32 whatever the input: text has no dtype",
}


def _tiny_dir() -> str:
    """A model dir made at collection time (parametrize_with_checks needs the estimator then)."""
    torch.manual_seed(1234)
    out = tempfile.mkdtemp(prefix="elmo-sk-")
    atexit.register(shutil.rmtree, out, True)
    export_model(BiLM(preset("tiny")).eval(), out)
    return out


@parametrize_with_checks([NumbersAsText(model=_tiny_dir(), device="cpu", batch_size=64)],
                         expected_failed_checks=lambda est: EXPECTED_FAILED)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
