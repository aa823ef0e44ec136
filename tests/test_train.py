"""Training: the bilm-tf tiny training case, sampler and sampled softmax, the
TF optimiser and clipping, export round trip, checkpoints and --resume after SIGKILL,
--init-from, and the one-line messages of `elmo train` on bad input."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, shared_path
from torch_elmo import ElmoEmbedder, batch_to_ids
from torch_elmo.cli import main
from torch_elmo.config import Options
from torch_elmo.checkpoint import export_run, load_checkpoint, load_language_model
from torch_elmo.train import clip_by_global_norm, make_optimizer, train
from torch_elmo.vocab import Vocabulary


pytestmark = pytest.mark.usefixtures("one_thread")


def bilm_tf_options(skip: bool = True, **training) -> dict:
    """bilm-tf tests/test_training.py, char inputs (fixtures README section D)."""
    d = {"bidirectional": True, "dropout": 0.1,
         "char_cnn": {"activation": "tanh", "embedding": {"dim": 4},
                      "filters": [[1, 8], [2, 8], [3, 16], [4, 32], [5, 64]],
                      "max_characters_per_token": 10, "n_characters": 261, "n_highway": 1},
         "lstm": {"cell_clip": 3, "dim": 16, "n_layers": 2, "proj_clip": 3, "projection_dim": 8,
                  "use_skip_connections": skip},
         "all_clip_norm_val": 1.0, "n_epochs": 50, "n_train_tokens": 134, "batch_size": 2,
         "unroll_steps": 10, "n_negative_samples_batch": 16}
    d.update(training)
    return d


@pytest.fixture(scope="module")
def train_data():
    d = shared_path("fixtures", "bilm-tf", "train")
    return str(d / "data.txt"), str(d / "vocab.txt")


def _test_perplexity(save_dir, data_file, vocab):
    from torch_elmo import data
    from torch_elmo.evaluate import perplexity
    lm, _ = load_language_model(save_dir)
    stream = data.LMBatchStream([data_file], vocab, 1, 1, max_chars=10, shuffle=False, loop=False)
    return perplexity(lm, stream)


@pytest.fixture(scope="module")
def tiny_runs(train_data, tmp_path_factory):
    """The bilm-tf tiny training case, with and without skip connections (300 updates each)."""
    data_file, vocab_file = train_data
    vocab = Vocabulary.read(vocab_file)
    out = {}
    for skip in (True, False):
        save_dir = str(tmp_path_factory.mktemp(f"tiny_skip{int(skip)}"))
        train(Options.from_dict(bilm_tf_options(skip)), vocab, [data_file], save_dir,
              log_every=100, checkpoint_every=10_000, progress=False)
        out[skip] = save_dir, _test_perplexity(save_dir, data_file, vocab)
    return out


@pytest.mark.parametrize("skip", [True, False], ids=["skip", "no-skip"])
def test_bilm_tf_tiny_training_case_perplexity_below_20(tiny_runs, skip):
    save_dir, ppl = tiny_runs[skip]
    assert ckpt_step(save_dir) == 300        # 50 epochs x floor(134 / (2 x 10)) updates
    assert ppl["n_batches"] == 134 + 5       # batch 1, unroll 1: every target of 5 sentences
    assert ppl["average"] < 20.0, ppl
    assert ppl["forward"] < 25 and ppl["backward"] < 25, ppl
    assert math.isclose(ppl["average"], math.sqrt(ppl["forward"] * ppl["backward"]), rel_tol=1e-9)


def ckpt_step(save_dir):
    return load_checkpoint(save_dir)["step"]


def test_run_dir_contents(tiny_runs):
    save_dir, _ = tiny_runs[True]
    opts = json.load(open(os.path.join(save_dir, "options.json")))
    assert opts["char_cnn"]["n_characters"] == 261           # bilm-tf training form
    assert opts["n_train_tokens"] == 134 and opts["n_tokens_vocab"] == 32
    lines = [json.loads(l) for l in open(os.path.join(save_dir, "metrics.jsonl"))]
    assert [m["step"] for m in lines] == [100, 200, 300]
    assert all({"tokens", "train_loss", "train_ppl", "tokens_per_s", "elapsed"} <= set(m)
               for m in lines)
    assert lines[-1]["tokens"] == 300 * 20
    ckpt = torch.load(os.path.join(save_dir, "checkpoint.pt"), weights_only=True)
    assert {"model", "softmax", "optimizer", "lstm_state", "rng", "sampler", "data", "step",
            "tokens", "options", "vocab"} <= set(ckpt)
    assert ckpt["softmax"]["W"].shape == (32, 8)
    assert ckpt["lstm_state"]["c"].shape == (2, 2, 2, 16)    # dirs, layers, batch rows, H


def test_export_round_trip_matches_elmo_embedder(tiny_runs, tmp_path):
    save_dir, _ = tiny_runs[True]
    assert main(["export", "--save-dir", save_dir, "--out", str(tmp_path / "model")]) == 0
    opts = json.load(open(tmp_path / "model" / "options.json"))
    assert opts["char_cnn"]["n_characters"] == 262 and set(opts) == {"lstm", "char_cnn"}
    elmo = ElmoEmbedder(tmp_path / "model" / "options.json", tmp_path / "model" / "weights.hdf5",
                        state="carry")   # first call: zero state
    lm, _ = load_language_model(save_dir)
    sentences = [["Neural", "language", "models", "."], ["The", "first", "sentence", "is", "long"]]
    got = elmo.embed_batch(sentences)
    with torch.no_grad():
        out = lm.bilm.eval()(batch_to_ids(sentences, max_chars=10, add_boundaries=True))
    layers = torch.stack(out["layers"]).numpy()
    for b, s in enumerate(sentences):
        assert got[b].shape == (3, len(s), 16)
        np.testing.assert_allclose(got[b], layers[:, b, 1:len(s) + 1], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------- sampler & softmax
def test_adagrad_and_clipping_match_tf_update():
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.randn(5, 3))
    v = torch.nn.Parameter(torch.randn(4))
    opt = make_optimizer([w, v], 0.2)
    ref_w, ref_v = w.detach().double().clone(), v.detach().double().clone()
    acc_w, acc_v = torch.ones(5, 3, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for _ in range(4):
        gw, gv = 3 * torch.randn(5, 3), 3 * torch.randn(4)
        w.grad, v.grad = gw.clone(), gv.clone()
        norm = clip_by_global_norm([w, v], 2.0)
        gn = math.sqrt(float((gw.double() ** 2).sum() + (gv.double() ** 2).sum()))
        assert math.isclose(norm, gn, rel_tol=1e-5)
        scale = 2.0 / max(gn, 2.0)                         # tf.clip_by_global_norm
        opt.step()
        for ref, acc, g in ((ref_w, acc_w, gw), (ref_v, acc_v, gv)):
            g = g.double() * scale
            acc += g * g                                   # TF Adagrad, no epsilon
            ref -= 0.2 * g / acc.sqrt()
        torch.testing.assert_close(w.detach().double(), ref_w, rtol=0, atol=1e-6)
        torch.testing.assert_close(v.detach().double(), ref_v, rtol=0, atol=1e-6)


def test_heldout_evaluation_leaves_training_untouched(train_data, tmp_path):
    """Held-out evals use a fresh stream and zero state and no RNG: same weights with or without."""
    data_file, vocab_file = train_data
    vocab = Vocabulary.read(vocab_file)
    opts = Options.from_dict(bilm_tf_options(True))
    for name, heldout in (("a", None), ("b", [data_file])):
        train(opts, vocab, [data_file], str(tmp_path / name), epochs=3, heldout_files=heldout,
              eval_every=4, heldout_batch_size=4, log_every=4, progress=False)
    a, b = load_checkpoint(str(tmp_path / "a")), load_checkpoint(str(tmp_path / "b"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    lines = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    assert [m["step"] for m in lines if "heldout_ppl_avg" in m] == [4, 8, 12, 16, 18]
    assert (tmp_path / "b" / "perplexity.png").stat().st_size > 1000


# ------------------------------------------------------------------------------- resume
def _cli_train(train_file, vocab, save_dir, opts_file, *extra):
    return ["train", "--train", train_file, "--vocab", vocab, "--save-dir", save_dir,
            "--options", opts_file, "--no-progress", "--seed", "3", *extra]


def test_resume_after_sigkill_gives_the_same_weights(train_data, tmp_path):
    data_file, vocab_file = train_data
    opts_file = tmp_path / "opts.json"
    opts_file.write_text(json.dumps(bilm_tf_options(True)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    args = ["--epochs", "10", "--checkpoint-every", "7", "--log-every", "5"]   # 60 updates

    def run(save_dir, *more, wait=True):
        cmd = [sys.executable, "-m", "torch_elmo",
               *_cli_train(data_file, vocab_file, str(save_dir), str(opts_file), *args, *more)]
        p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        if wait:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        return p

    run(tmp_path / "full")
    killed = run(tmp_path / "killed", wait=False)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 60
    while not ckpt.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    step_at_kill = load_checkpoint(str(tmp_path / "killed"))["step"]
    assert 0 < step_at_kill < 60
    run(tmp_path / "killed", "--resume")

    full, resumed = load_checkpoint(str(tmp_path / "full")), load_checkpoint(str(tmp_path / "killed"))
    assert full["step"] == resumed["step"] == 60 and full["tokens"] == resumed["tokens"]
    for k in full["model"]:
        torch.testing.assert_close(resumed["model"][k], full["model"][k], rtol=0, atol=1e-6)
    for k in ("W", "b"):
        torch.testing.assert_close(resumed["softmax"][k], full["softmax"][k], rtol=0, atol=1e-6)
    assert resumed["data"]["batches"] == full["data"]["batches"] == 60

    def losses(d):
        return [(m["step"], m["tokens"], m["train_loss"])
                for m in map(json.loads, open(d / "metrics.jsonl"))]
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")   # nothing lost or repeated


def test_init_from_run_dir_and_exported_model(tiny_runs, train_data, tmp_path):
    data_file, vocab_file = train_data
    vocab = Vocabulary.read(vocab_file)
    src, _ = tiny_runs[True]
    source = load_checkpoint(src)
    opts = Options.from_dict(bilm_tf_options(True))
    # a run directory with the same vocabulary: biLM and softmax carried over
    train(opts, vocab, [data_file], str(tmp_path / "a"), init_from=src, max_tokens=0,
          progress=False)
    a = load_checkpoint(str(tmp_path / "a"))
    assert a["step"] == 0
    for k in source["model"]:
        assert torch.equal(a["model"][k], source["model"][k]), k
    assert torch.equal(a["softmax"]["W"], source["softmax"]["W"])
    # an exported model (weights.hdf5): biLM carried over, new softmax
    export_run(src, str(tmp_path / "model"))
    train(opts, vocab, [data_file], str(tmp_path / "b"), init_from=str(tmp_path / "model"),
          max_tokens=0, progress=False)
    b = load_checkpoint(str(tmp_path / "b"))
    for k in source["model"]:
        torch.testing.assert_close(b["model"][k], source["model"][k], rtol=0, atol=0)
    assert not torch.equal(b["softmax"]["W"], source["softmax"]["W"])
    # and fine-tuning from it runs
    train(opts, vocab, [data_file], str(tmp_path / "c"),
          init_from=str(tmp_path / "model" / "weights.hdf5"), epochs=1, progress=False)
    assert load_checkpoint(str(tmp_path / "c"))["step"] == 6


# ------------------------------------------------------------------------ bad input (CLI)
@pytest.fixture
def corpus(tmp_path, train_data):
    """The fixture's training data, its vocabulary as `elmo vocab` builds it (the fixture's own
    covers 64% of these tokens, which draws a warning), and bilm-tf's tiny options."""
    from torch_elmo.vocab import build_vocabulary, count_words
    data_file, _ = train_data
    vocab_file = str(tmp_path / "vocab.txt")
    build_vocabulary(count_words([data_file])).write(vocab_file)
    opts_file = tmp_path / "opts.json"
    opts = bilm_tf_options(True)
    del opts["n_train_tokens"]        # counted from the data (and the vocab checked on the way)
    opts_file.write_text(json.dumps(opts))
    return tmp_path, data_file, vocab_file, str(opts_file)


def _run_cli(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _error_line(err):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_glob_matching_nothing(capsys, corpus):
    tmp, _, vocab, opts = corpus
    rc, _, err = _run_cli(capsys, _cli_train(str(tmp / "nothing*.txt"), vocab, str(tmp / "r"), opts))
    assert rc == 2
    assert _error_line(err).startswith("elmo train: error: glob ")
    assert "matches no files" in err


def test_empty_training_file(capsys, corpus):
    tmp, _, vocab, opts = corpus
    (tmp / "empty.txt").write_text("")
    rc, _, err = _run_cli(capsys, _cli_train(str(tmp / "empty.txt"), vocab, str(tmp / "r"), opts))
    assert rc == 2
    assert "empty.txt: file is empty" in _error_line(err)
    (tmp / "blank.txt").write_text("\n  \n\n")
    rc, _, err = _run_cli(capsys, _cli_train(str(tmp / "blank.txt"), vocab, str(tmp / "r"), opts))
    assert rc == 2
    assert "blank.txt" in _error_line(err) and "no tokens" in err


def test_heldout_too_small_for_its_batch_size(capsys, corpus):
    tmp, data_file, vocab, opts = corpus
    rc, _, err = _run_cli(capsys, _cli_train(data_file, vocab, str(tmp / "r"), opts,
                                             "--heldout", data_file))   # 5 sentences, 256 rows
    assert rc == 2
    assert "--heldout-batch-size" in _error_line(err)
    assert not (tmp / "r" / "checkpoint.pt").exists()


def test_blank_lines_are_skipped(capsys, corpus):
    tmp, data_file, vocab, opts = corpus
    text = open(data_file).read()
    (tmp / "blank.txt").write_text("\n\n" + text.replace("\n", "\n\n   \n") + "\n")
    rc, out, err = _run_cli(capsys, _cli_train(str(tmp / "blank.txt"), vocab, str(tmp / "r"), opts,
                                               "--epochs", "1"))
    assert rc == 0, err
    ckpt = load_checkpoint(str(tmp / "r"))
    assert ckpt["step"] == 6 and ckpt["run"]["n_train_tokens"] == 134


def test_vocab_missing_specials(capsys, corpus):
    tmp, data_file, _, opts = corpus
    (tmp / "v.txt").write_text("the\nof\n<S>\n")
    rc, _, err = _run_cli(capsys, _cli_train(data_file, str(tmp / "v.txt"), str(tmp / "r"), opts))
    assert rc == 2
    line = _error_line(err)
    assert "v.txt" in line and "</S>" in line and "<UNK>" in line


def test_vocab_not_frequency_sorted_warns(capsys, corpus):
    tmp, data_file, vocab, opts = corpus
    tokens = open(vocab).read().split()
    (tmp / "v.txt").write_text("\n".join(tokens[:3] + tokens[3:][::-1]) + "\n")
    rc, _, err = _run_cli(capsys, _cli_train(data_file, str(tmp / "v.txt"), str(tmp / "r"), opts,
                                             "--max-tokens", "20"))
    assert rc == 0, err
    warn = [l for l in err.splitlines() if "warning" in l]
    assert len(warn) == 1 and warn[0].startswith("elmo train: warning: ")
    assert "v.txt" in warn[0] and "not sorted by descending frequency" in warn[0]


def test_non_utf8_line_is_skipped_with_a_counted_warning(capsys, corpus):
    tmp, data_file, vocab, opts = corpus
    lines = open(data_file, "rb").read().splitlines(keepends=True)
    (tmp / "bad.txt").write_bytes(b"".join(lines[:2]) + b"caf\xe9 au lait\n" + b"".join(lines[2:]))
    rc, _, err = _run_cli(capsys, _cli_train(str(tmp / "bad.txt"), vocab, str(tmp / "r"), opts,
                                             "--epochs", "2"))
    assert rc == 0, err
    warn = [l for l in err.splitlines() if "warning" in l]
    assert len(warn) == 1, err
    assert warn[0].startswith("elmo train: warning: ") and "bad.txt:3" in warn[0]
    assert "UTF-8" in warn[0] and "#1" in warn[0]
    assert load_checkpoint(str(tmp / "r"))["run"]["n_train_tokens"] == 134


def test_resume_with_different_options_or_vocab_is_refused(capsys, corpus):
    tmp, data_file, vocab, opts = corpus
    run = str(tmp / "r")
    rc, _, err = _run_cli(capsys, _cli_train(data_file, vocab, run, opts, "--max-tokens", "40"))
    assert rc == 0, err
    rc, _, err = _run_cli(capsys, _cli_train(data_file, vocab, run, opts, "--resume",
                                             "--batch-size", "4"))
    assert rc == 2
    line = _error_line(err)
    assert line.startswith("elmo train: error: --resume: options differ") and "batch_size" in line
    tokens = open(vocab).read().split()
    (tmp / "v2.txt").write_text("\n".join(tokens + ["extra"]) + "\n")
    rc, _, err = _run_cli(capsys, _cli_train(data_file, str(tmp / "v2.txt"), run, opts, "--resume"))
    assert rc == 2 and "vocabulary" in _error_line(err)
    # the same command resumes; a new run refuses to overwrite the checkpoint
    rc, _, err = _run_cli(capsys, _cli_train(data_file, vocab, run, opts, "--resume",
                                             "--max-tokens", "80"))
    assert rc == 0, err
    assert load_checkpoint(run)["step"] == 4
    rc, _, err = _run_cli(capsys, _cli_train(data_file, vocab, run, opts))
    assert rc == 2 and "--resume" in _error_line(err)
    rc, _, err = _run_cli(capsys, _cli_train(data_file, vocab, str(tmp / "none"), opts, "--resume"))
    assert rc == 2 and "no checkpoint" in _error_line(err)


def test_preset_defaults_are_bilm_tf_training_defaults(capsys, corpus, monkeypatch):
    """--preset with no overrides gives bilm-tf's training defaults; flags override."""
    import torch_elmo.train as tr
    seen = {}
    monkeypatch.setattr(tr, "train", lambda options, *a, **k: seen.setdefault("o", options))
    tmp, data_file, vocab, _ = corpus
    argv = ["train", "--train", data_file, "--vocab", vocab, "--save-dir", str(tmp / "p"),
            "--preset", "tiny"]
    assert main(argv) == 0
    o = seen.pop("o")
    assert (o.batch_size, o.unroll_steps, o.n_negative_samples_batch, o.learning_rate,
            o.all_clip_norm_val, o.dropout, o.n_epochs) == (128, 20, 8192, 0.2, 10.0, 0.1, 10)
    assert main(argv + ["--batch-size", "8", "--unroll-steps", "5", "--n-negative-samples", "64",
                        "--clip-norm", "1", "--dropout", "0", "--learning-rate", "0.1"]) == 0
    o = seen.pop("o")
    assert (o.batch_size, o.unroll_steps, o.n_negative_samples_batch, o.learning_rate,
            o.all_clip_norm_val, o.dropout) == (8, 5, 64, 0.1, 1.0, 0.0)


def test_fractional_epochs_max_tokens_and_bf16(train_data, tmp_path):
    data_file, vocab_file = train_data
    vocab = Vocabulary.read(vocab_file)
    opts = Options.from_dict(bilm_tf_options(True))
    train(opts, vocab, [data_file], str(tmp_path / "a"), epochs=0.5, progress=False)
    assert load_checkpoint(str(tmp_path / "a"))["step"] == 3           # floor(0.5 x 6)
    train(opts, vocab, [data_file], str(tmp_path / "b"), max_tokens=50, progress=False)
    assert load_checkpoint(str(tmp_path / "b"))["step"] == 3           # 20 tokens a batch
    rec = train(opts, vocab, [data_file], str(tmp_path / "c"), epochs=1, bf16=True,
                log_every=1, progress=False)
    assert rec["step"] == 6 and math.isfinite(rec["train_loss"])


# ------------------------------------------------------- state_reset_prob (zero-state attractor)
def test_state_reset_prob_changes_training_resumes_exactly_and_is_validated(tmp_path, capsys,
                                                                            train_data, corpus):
    """Rows' carried states zeroed at random (not in bilm-tf; default 0 = its recipe): the draws
    come from the checkpointed RNG, so a run split in two equals one run."""
    data_file, vocab_file = train_data
    vocab = Vocabulary.read(vocab_file)
    opts = Options.from_dict(bilm_tf_options(True)).replace(state_reset_prob=0.5)
    train(opts, vocab, [data_file], str(tmp_path / "full"), epochs=2, progress=False)
    train(opts, vocab, [data_file], str(tmp_path / "split"), epochs=1, progress=False)
    train(opts, vocab, [data_file], str(tmp_path / "split"), epochs=2, resume=True, progress=False)
    train(opts.replace(state_reset_prob=0.0), vocab, [data_file], str(tmp_path / "none"),
          epochs=2, progress=False)
    full, split, none = (load_checkpoint(str(tmp_path / d)) for d in ("full", "split", "none"))
    assert json.loads(full["options"])["state_reset_prob"] == 0.5
    for k in full["model"]:
        torch.testing.assert_close(split["model"][k], full["model"][k], rtol=0, atol=1e-6)
    assert any(not torch.equal(full["model"][k], none["model"][k]) for k in full["model"])
    tmp, _, vocab_f, opts_f = corpus
    rc, _, err = _run_cli(capsys, _cli_train(data_file, vocab_f, str(tmp / "r"), opts_f,
                                             "--state-reset-prob", "1.5"))
    assert rc == 2 and "state_reset_prob must be in [0, 1)" in _error_line(err)


def test_two_runs_into_one_save_dir_the_second_refuses(capsys, corpus):
    from torch_elmo.checkpoint import lock_run_dir
    tmp, data_file, vocab, opts = corpus
    run = tmp / "locked"
    lock = lock_run_dir(str(run))               # as a running `elmo train` holds it
    try:
        rc, _, err = _run_cli(capsys, _cli_train(data_file, vocab, str(run), opts, "--max-tokens", "40"))
        assert rc == 2 and "in use by another `elmo train`" in _error_line(err)
        assert not (run / "checkpoint.pt").exists() and not (run / "metrics.jsonl").exists()
    finally:
        lock.close()
    rc, _, err = _run_cli(capsys, _cli_train(data_file, vocab, str(run), opts, "--max-tokens", "40"))
    assert rc == 0, err


def test_fast_recipe_schedule_and_optimizer():
    from torch_elmo.config import preset
    from torch_elmo.train import learning_rate_at, recipe_optimizer
    base = preset("tiny")
    assert learning_rate_at(base, 0, 0.0) == learning_rate_at(base, 10**6, 1.0) == 0.2
    fast = base.replace(recipe="fast", learning_rate=1e-2)
    assert math.isclose(learning_rate_at(fast, 0, 0.0), 1e-2 / 100)          # warm-up
    assert math.isclose(learning_rate_at(fast, 99, 0.0), 1e-2)
    assert math.isclose(learning_rate_at(fast, 500, 0.5), 1e-2 * (0.1 + 0.9 * 0.5))
    assert math.isclose(learning_rate_at(fast, 900, 1.0), 1e-3)               # final fraction
    p = [torch.nn.Parameter(torch.ones(2))]
    assert isinstance(recipe_optimizer(p, fast), torch.optim.AdamW)
    assert isinstance(recipe_optimizer(p, base), torch.optim.Adagrad)


def test_fast_recipe_trains_resumes_and_keeps_its_recipe(capsys, corpus):
    tmp, data_file, vocab, opts = corpus
    run = str(tmp / "fast")
    rc, out, err = _run_cli(capsys, _cli_train(data_file, vocab, run, opts, "--recipe", "fast",
                                               "--max-tokens", "200"))
    assert rc == 0, err
    ck = load_checkpoint(run)
    saved = json.loads(ck["options"])
    assert saved["recipe"] == "fast" and saved["learning_rate"] == 1e-2
    assert saved["dropout"] == 0.0 and saved["n_negative_samples_batch"] == 4096  # the recipe's
    assert "exp_avg" in str(ck["optimizer"]["state"][0].keys())               # AdamW moments
    rc, out, err = _run_cli(capsys, _cli_train(data_file, vocab, run, opts, "--resume",
                                               "--max-tokens", "400"))
    assert rc == 0, err
    assert json.loads(load_checkpoint(run)["options"])["recipe"] == "fast"
    rc, out, err = _run_cli(capsys, _cli_train(data_file, vocab, run, opts, "--resume",
                                               "--recipe", "bilm-tf", "--max-tokens", "600"))
    assert rc == 2 and "recipe" in _error_line(err)


@pytest.mark.parametrize("speedup", [None, 0.6, 1.5])
def test_fast_recipe_uses_bf16_only_where_measured_faster(capsys, corpus, monkeypatch, tmp_path,
                                                          speedup):
    """precision.choose decides, the loop reads it; the header says what and why. None: an
    AVX2-only CPU (bf16 emulated, ~57x slower matmuls, nothing measured)."""
    from torch_elmo import precision
    monkeypatch.setenv("TORCH_ELMO_AUTOTUNE", "1")
    monkeypatch.setenv("TORCH_ELMO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "bf16_native", lambda device: speedup is not None)
    monkeypatch.setattr(precision, "measure", lambda *a, **k: {"speedup": speedup})
    tmp, data_file, vocab, opts = corpus
    rc, out, err = _run_cli(capsys, _cli_train(data_file, vocab, str(tmp / f"r{speedup}"), opts,
                                               "--recipe", "fast", "--max-tokens", "100"))
    assert rc == 0, err
    header = out.splitlines()[0]
    assert header.endswith({None: "; fp32: this CPU has no native bf16",
                            0.6: "; fp32: bf16 measured x0.60 here",
                            1.5: "; bf16: measured x1.50 of fp32 here"}[speedup])
    # an explicit --bf16 is obeyed, with a one-line warning where bf16 is emulated or slower
    rc, out, err = _run_cli(capsys, _cli_train(data_file, vocab, str(tmp / f"b{speedup}"), opts,
                                               "--bf16", "--max-tokens", "100"))
    assert rc == 0, err
    assert "; bf16 (asked" in out.splitlines()[0]
    warned = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(warned) == (0 if speedup == 1.5 else 1)
    assert ("no native bf16" in err) == (speedup is None)
    assert ("measured x0.60" in err) == (speedup == 0.6)
    # the bilm-tf recipe stays fp32, nothing measured
    monkeypatch.setattr(precision, "measure", lambda *a, **k: pytest.fail("measured"))
    rc, out, err = _run_cli(capsys, _cli_train(data_file, vocab, str(tmp / f"c{speedup}"), opts,
                                               "--max-tokens", "100"))
    assert rc == 0 and out.splitlines()[0].endswith("; fp32")


def test_cli_export_writes_safetensors_too(tiny_runs, tmp_path, capsys):
    pytest.importorskip("safetensors")
    save_dir, _ = tiny_runs[True]
    out = tmp_path / "exp"
    assert main(["export", "--save-dir", save_dir, "--out", str(out), "--safetensors"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["options.json", "weights.hdf5",
                                                      "weights.safetensors"]



def test_progress_in_a_log_file_is_the_step_lines_only(capsys, corpus):
    """stderr not a terminal (capsys): no bar redraws, the step lines are the progress;
    --progress brings the bar back, --no-progress is still accepted."""
    tmp, data_file, vocab, opts = corpus
    argv = ["train", "--train", data_file, "--vocab", vocab, "--options", opts, "--epochs", "2",
            "--log-every", "4"]
    rc, out, err = _run_cli(capsys, argv + ["--save-dir", str(tmp / "a")])
    assert rc == 0, err
    assert "\r" not in out + err and "it/s" not in err and "batch/s" not in err
    assert [l.split(" | ")[0] for l in out.splitlines() if l.startswith("step")] == [
        "step 4/12", "step 8/12", "step 12/12"]
    rc, out, err = _run_cli(capsys, argv + ["--save-dir", str(tmp / "b"), "--progress"])
    assert rc == 0 and "\r" in err and "12/12" in err
    rc, out, err = _run_cli(capsys, argv + ["--save-dir", str(tmp / "c"), "--no-progress"])
    assert rc == 0 and "\r" not in err


def test_resume_with_other_train_files_names_them_and_the_way_out(capsys, corpus):
    tmp, data_file, vocab, opts = corpus
    run = str(tmp / "r")
    rc, _, err = _run_cli(capsys, _cli_train(data_file, vocab, run, opts, "--max-tokens", "40"))
    assert rc == 0, err
    other = tmp / "other.txt"
    other.write_text(open(data_file).read())
    rc, _, err = _run_cli(capsys, _cli_train(str(other), vocab, run, opts, "--resume"))
    assert rc == 2
    line = _error_line(err)
    assert "at file 1 of 1 now (1 then)" in line
    assert "other.txt now" in line and f"{os.path.basename(data_file)} then" in line
    assert "drop --resume" in line and "--init-from " in line and "--save-dir NEW_DIR" in line


def test_vocabulary_coverage_in_the_header_and_a_warning_below_95_percent(capsys, corpus):
    tmp, data_file, vocab, opts = corpus
    argv = ["--max-tokens", "20"]
    rc, out, err = _run_cli(capsys, _cli_train(data_file, vocab, str(tmp / "a"), opts, *argv))
    assert rc == 0 and "warning" not in err, err
    assert "covering 100.0% of the training tokens" in out
    # the vocabulary without the words that occur once: it covers under 95% of the tokens
    counts = {}
    for w in open(data_file).read().split():
        counts[w] = counts.get(w, 0) + 1
    total = sum(counts.values())
    kept = [t for t in open(vocab).read().split() if counts.get(t, 0) != 1]
    covered = sum(counts.get(t, 0) for t in kept)
    assert 0.5 < covered / total < 0.95        # the old threshold (50%) said nothing here
    (tmp / "v.txt").write_text("\n".join(kept) + "\n")
    rc, out, err = _run_cli(capsys, _cli_train(data_file, str(tmp / "v.txt"), str(tmp / "b"),
                                               opts, *argv))
    assert rc == 0, err
    pct = f"{100 * covered / total:.1f}%"
    warn = [l for l in err.splitlines() if "warning" in l]
    assert len(warn) == 1 and warn[0].startswith(
        f"elmo train: warning: {tmp / 'v.txt'} covers {pct} of the training tokens; the rest "
        f"train <UNK>"), err
    assert f"covering {pct} of the training tokens" in out
    # a resumed run shows the figure of its start; --n-train-tokens skips the count
    rc, out, err = _run_cli(capsys, _cli_train(data_file, str(tmp / "v.txt"), str(tmp / "b"),
                                               opts, "--resume", "--max-tokens", "40"))
    assert rc == 0 and f"covering {pct} of the training tokens (counted when the run started)" \
        in out, err
    rc, out, err = _run_cli(capsys, _cli_train(data_file, vocab, str(tmp / "c"), opts, *argv,
                                               "--n-train-tokens", "134"))
    assert rc == 0 and "not counted (--n-train-tokens given)" in out, err


def test_init_from_another_architecture_names_the_options_and_the_fix(capsys, corpus):
    tmp, data_file, vocab, opts = corpus
    train(Options.from_dict(json.load(open(opts))), Vocabulary.read(vocab), [data_file],
          str(tmp / "src"), max_tokens=0, progress=False)
    other = json.load(open(opts))
    other["lstm"]["projection_dim"], other["char_cnn"]["n_highway"] = 4, 2
    (tmp / "other.json").write_text(json.dumps(other))
    rc, _, err = _run_cli(capsys, _cli_train(data_file, vocab, str(tmp / "r"),
                                             str(tmp / "other.json"), "--init-from",
                                             str(tmp / "src"), "--max-tokens", "20"))
    assert rc == 2
    line = _error_line(err)
    assert "char_cnn.n_highway 1 vs 2, lstm.projection_dim 8 vs 4 (the model's vs this run's)" \
        in line, line
    assert f"--options {os.path.relpath(tmp / 'src' / 'options.json')}" in line or \
        "src/options.json" in line
    assert "leave out --preset / --options" in line
    # the fix it names works: the model's own options
    rc, _, err = _run_cli(capsys, ["train", "--train", data_file, "--vocab", vocab, "--save-dir",
                                   str(tmp / "r"), "--options", str(tmp / "src" / "options.json"),
                                   "--init-from", str(tmp / "src"), "--max-tokens", "20"])
    assert rc == 0, err


def test_bilm_tf_walkthrough_flags_run_with_elmo_in_front(capsys, corpus, monkeypatch):
    """bilm-tf README's train_elmo.py / run_test.py / dump_weights.py commands, `elmo` in front."""
    import h5py
    import torch_elmo.train as tr
    from torch_elmo import load_bilm
    tmp, data_file, vocab, opts = corpus
    ckpt_dir = str(tmp / "ckpt")
    walkthrough = ["train", f"--train_prefix={data_file}", "--vocab_file", vocab, "--save_dir",
                   ckpt_dir]
    seen = {}
    with monkeypatch.context() as m:    # as written: which options it trains with
        m.setattr(tr, "train", lambda options, *a, **k: seen.update(o=options, a=a, k=k))
        rc, _, err = _run_cli(capsys, walkthrough)
    assert rc == 0, err
    assert seen["o"].lstm.dim == 1024 and seen["a"][1] == [data_file] and seen["a"][2] == ckpt_dir
    assert "note: no --preset or --options" in err and "--preset original" in err
    # a real run (the tiny options: the fixture corpus has fewer tokens than one 128 x 20 batch)
    rc, _, err = _run_cli(capsys, walkthrough + ["--options", opts, "--n_epochs", "1",
                                                 "--batch_size", "2"])
    assert rc == 0, err
    assert load_checkpoint(ckpt_dir)["step"] == 6
    rc, out, err = _run_cli(capsys, ["test", f"--test_prefix={data_file}", "--vocab_file", vocab,
                                     "--save_dir", ckpt_dir, "--batch_size", "2"])
    assert rc == 0 and "average perplexity" in out, err
    weights = tmp / "out" / "weights.hdf5"
    (tmp / "out").mkdir()
    rc, out, err = _run_cli(capsys, ["export", "--save_dir", ckpt_dir, "--outfile", str(weights)])
    assert rc == 0, err
    options = json.load(open(tmp / "out" / "options.json"))
    assert options["char_cnn"]["n_characters"] == 262
    with h5py.File(weights) as f:
        assert "CNN" in f and "RNN_0" in f
    assert load_bilm(tmp / "out" / "options.json", weights).options.lstm.dim == 16
    # beside the run's own options.json, --outfile would replace them: refused
    rc, _, err = _run_cli(capsys, ["export", "--save_dir", ckpt_dir, "--outfile",
                                   os.path.join(ckpt_dir, "weights.hdf5")])
    assert rc == 2 and "training options" in _error_line(err)
