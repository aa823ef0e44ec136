"""Held-out perplexity (bilm-tf run_test.py) and `elmo test`."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import shared_path
from torch_elmo import batch_to_ids, data
from torch_elmo.cli import main
from torch_elmo.config import Options
from torch_elmo.evaluate import perplexity
from torch_elmo.lm import LanguageModel
from torch_elmo.train import train
from torch_elmo.vocab import Vocabulary


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_options(**kw) -> Options:
    d = {"char_cnn": {"activation": "relu", "embedding": {"dim": 4},
                      "filters": [[1, 4], [2, 8], [3, 8]], "max_characters_per_token": 12,
                      "n_characters": 261, "n_highway": 1},
         "lstm": {"cell_clip": 3, "dim": 16, "n_layers": 2, "proj_clip": 3, "projection_dim": 8,
                  "use_skip_connections": True},
         "batch_size": 2, "unroll_steps": 5, "n_negative_samples_batch": 8}
    d.update(kw)
    return Options.from_dict(d)


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.read(shared_path("fixtures", "bilm-tf", "train", "vocab.txt"))


def test_perplexity_matches_an_independent_full_softmax_computation(vocab, tmp_path):
    """One sentence, batch 1, unroll 1, state carried: the per-position cross-entropies of the
    inference forward pass (BiLM.forward on <S> w1..wn </S>) give the same perplexities."""
    torch.manual_seed(0)
    lm = LanguageModel(tiny_options(), len(vocab)).eval()
    with torch.no_grad():
        lm.softmax_b.normal_()
    tokens = "the neural language model of the words is a zzz .".split()
    f = tmp_path / "one.txt"
    f.write_text(" ".join(tokens) + "\n")
    stream = data.LMBatchStream([str(f)], vocab, 1, 1, max_chars=12, shuffle=False, loop=False)
    got = perplexity(lm, stream)
    n = len(tokens)
    assert got["n_batches"] == n + 1 and got["n_tokens"] == n + 1

    ids = [vocab.bos] + [vocab.word_to_id(t) for t in tokens] + [vocab.eos]
    with torch.no_grad():
        chars = batch_to_ids([tokens], max_chars=12, add_boundaries=True)
        top = lm.bilm(chars)["layers"][-1][0]                                 # (n+2, 2P)
        P = lm.bilm.proj_dim
        fwd = F.cross_entropy(top[:n + 1, :P] @ lm.softmax_W.t() + lm.softmax_b,
                              torch.tensor(ids[1:]))      # position i predicts token i+1
        bwd = F.cross_entropy(top[1:, P:] @ lm.softmax_W.t() + lm.softmax_b,
                              torch.tensor(ids[:-1]))     # position i predicts token i-1
    assert top.shape[0] == n + 2
    assert math.isclose(got["forward"], math.exp(fwd), rel_tol=1e-5)
    assert math.isclose(got["backward"], math.exp(bwd), rel_tol=1e-5)
    assert math.isclose(got["average"], math.exp(0.5 * (fwd + bwd)), rel_tol=1e-5)


def test_perplexity_is_exp_of_mean_per_batch_loss_and_leaves_mode(vocab, tmp_path):
    torch.manual_seed(1)
    lm = LanguageModel(tiny_options(), len(vocab)).train()
    f = shared_path("fixtures", "bilm-tf", "train", "data.txt")

    def stream(batch):
        return data.LMBatchStream([str(f)], vocab, batch, 1, max_chars=12, shuffle=False,
                                  loop=False)
    got = perplexity(lm, stream(3))
    assert lm.training                                     # mode restored
    # by hand: state carried, mean of per-batch losses
    lm.eval()
    state, fwd, bwd = lm.zero_state(3), [], []
    with torch.no_grad():
        for batch in stream(3):
            (f_ce, b_ce), state = lm.eval_cross_entropy(batch, state)
            fwd.append(float(f_ce))
            bwd.append(float(b_ce))
    assert got["n_batches"] == len(fwd) > 10
    assert math.isclose(got["forward"], math.exp(sum(fwd) / len(fwd)), rel_tol=1e-6)
    assert math.isclose(got["backward"], math.exp(sum(bwd) / len(bwd)), rel_tol=1e-6)
    avg = sum(0.5 * (a + b) for a, b in zip(fwd, bwd)) / len(fwd)
    assert math.isclose(got["average"], math.exp(avg), rel_tol=1e-6)
    assert perplexity(lm, stream(3), max_batches=5)["n_batches"] == 5
    with pytest.raises(Exception, match="no complete batch"):
        perplexity(lm, stream(1000))


@pytest.fixture(scope="module")
def run_dir(vocab, tmp_path_factory):
    f = shared_path("fixtures", "bilm-tf", "train", "data.txt")
    d = tmp_path_factory.mktemp("run")
    train(tiny_options(), vocab, [str(f)], str(d), epochs=2, progress=False)
    return str(d), str(f)


def test_elmo_test_prints_three_perplexities(run_dir, vocab, capsys):
    save_dir, f = run_dir
    vocab_file = str(shared_path("fixtures", "bilm-tf", "train", "vocab.txt"))
    assert main(["test", "--test", f, "--vocab", vocab_file, "--save-dir", save_dir,
                 "--batch-size", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [l.split(":")[0] for l in out] == ["forward perplexity", "backward perplexity",
                                              "average perplexity"]
    values = [float(l.split(":")[1]) for l in out]
    from torch_elmo.checkpoint import load_language_model
    lm, _ = load_language_model(save_dir)
    ppl = perplexity(lm, data.LMBatchStream([f], vocab, 4, 1, max_chars=12, shuffle=False,
                                            loop=False))
    for v, k in zip(values, ("forward", "backward", "average")):
        assert abs(v - ppl[k]) < 1e-3


def test_elmo_test_bad_input(run_dir, tmp_path, capsys):
    save_dir, f = run_dir
    vocab_file = str(shared_path("fixtures", "bilm-tf", "train", "vocab.txt"))

    def err_of(argv):
        assert main(argv) == 2
        lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("elmo test: error: "), lines
        return lines[0]

    base = ["test", "--vocab", vocab_file, "--save-dir", save_dir]
    assert "matches no files" in err_of(base + ["--test", str(tmp_path / "no*.txt")])
    (tmp_path / "empty.txt").write_text("")
    assert "empty" in err_of(base + ["--test", str(tmp_path / "empty.txt")])
    (tmp_path / "short.txt").write_text("a b\n")
    assert "no complete batch" in err_of(base + ["--test", str(tmp_path / "short.txt")])
    (tmp_path / "v.txt").write_text(open(vocab_file).read() + "extra\n")
    assert "vocabulary" in err_of(["test", "--vocab", str(tmp_path / "v.txt"), "--save-dir",
                                   save_dir, "--test", f])
    assert "no checkpoint" in err_of(["test", "--vocab", vocab_file, "--save-dir",
                                      str(tmp_path), "--test", f])
