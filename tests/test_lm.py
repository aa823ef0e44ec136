"""torch_elmo.lm: the log-uniform sampler (TF's), the sampled softmax (TF's formula, the fused
version, expectation against the full softmax), and the sparse softmax gradient."""
import math

import numpy as np
import pytest
import torch

from torch_elmo.lm import LanguageModel, LogUniformSampler, full_softmax_ce, sampled_softmax_loss
from torch_elmo.train import clip_by_global_norm, make_optimizer


pytestmark = pytest.mark.usefixtures("one_thread")


def test_sampler_matches_one_draw_at_a_time():
    """Vectorised unique sampling == TF's loop: draw, skip repeats, count every draw."""
    for n in (1, 50, 400, 900):
        got, tries = LogUniformSampler(1000, seed=n).sample(n)
        draws = LogUniformSampler(1000, seed=n).draw(200_000).tolist()
        seen, order, i = set(), [], 0
        while len(order) < n:
            if draws[i] not in seen:
                seen.add(draws[i])
                order.append(draws[i])
            i += 1
        assert got.tolist() == order and tries == i


def test_sampler_reproduces_log_uniform_distribution():
    V = 20
    s = LogUniformSampler(V, seed=0)
    draws = s.draw(200_000)
    observed = np.bincount(draws.numpy(), minlength=V)
    p = (np.log(np.arange(V) + 2.0) - np.log(np.arange(V) + 1.0)) / np.log(V + 1.0)
    assert abs(p.sum() - 1) < 1e-12
    np.testing.assert_allclose(s.probability(torch.arange(V)).numpy(), p, rtol=1e-12)
    expected = p * draws.numel()
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 43.8, chi2          # chi-square, 19 degrees of freedom, p = 0.001


def test_expected_counts_are_inclusion_probabilities():
    V, n, trials = 30, 10, 4000
    s = LogUniformSampler(V, seed=1)
    included = np.zeros(V)
    q_mean = np.zeros(V)
    for _ in range(trials):
        ids, tries = s.sample(n)
        included[ids.numpy()] += 1
        q_mean += s.expected_count(torch.arange(V), n, tries).numpy()
    freq, q_mean = included / trials, q_mean / trials
    assert abs(freq.sum() - n) < 1e-9
    # TF's Q = 1 - (1 - p)^num_tries is an approximation of the inclusion probability (it treats
    # num_tries as fixed); largest error on the most frequent class
    np.testing.assert_allclose(q_mean, freq, atol=0.06)
    assert np.abs(q_mean - freq).mean() < 0.015
    # and the no-repeat shortcut: Q = p * n exactly when num_tries == n
    q = s.expected_count(torch.arange(V), n, n)
    np.testing.assert_allclose(q.numpy(), n * s.probability(torch.arange(V)).numpy(), rtol=1e-6)


def test_sampled_softmax_agrees_with_full_softmax_in_expectation():
    """TF's sampled-softmax loss estimates the full-softmax loss from below (log of an estimated
    partition function, Jensen; a rare true class has Q < 1): its mean over draws approaches the
    full loss as the negatives cover the vocabulary. The partition estimate itself is unbiased up
    to TF's approximate Q."""
    torch.manual_seed(0)
    V, P, N, trials = 50, 8, 64, 800
    x, W, b = torch.randn(N, P), 0.5 * torch.randn(V, P), 0.5 * torch.randn(V)
    y = LogUniformSampler(V, seed=9).draw(N)          # Zipf-distributed targets, like text
    full = float(full_softmax_ce(x, y, W, b).mean())
    gaps = []
    for n in (10, 25, 48):
        s = LogUniformSampler(V, seed=n)
        losses = torch.tensor([float(sampled_softmax_loss(x, y, W, b, s, n))
                               for _ in range(trials)])
        mean, sem = float(losses.mean()), float(losses.std()) / math.sqrt(trials)
        assert sem < 0.02
        gaps.append(full - mean)
    assert 0 < gaps[2] < gaps[1] < gaps[0], gaps
    assert gaps[2] < 0.005 * full, (gaps, full)

    # the partition estimate behind it: E[sum_{j in S} exp(b_j) / Q_j] = sum_j exp(b_j)
    s = LogUniformSampler(V, seed=2)
    z = []
    for _ in range(trials):
        ids, tries = s.sample(25)
        z.append(float((torch.exp(b[ids]) / s.expected_count(ids, 25, tries)).sum()))
    assert abs(np.mean(z) / float(torch.exp(b).sum()) - 1) < 0.05


def test_sampled_softmax_loss_is_tf_formula():
    """Hand-computed TF sampled_softmax_loss: logits x.W_k + b_k - log Q_k for the true class and
    the sampled ones, accidental hits removed, cross-entropy with the true class first."""
    torch.manual_seed(1)
    V, P, N, n = 12, 4, 6, 5
    x, W, b = torch.randn(N, P), torch.randn(V, P), torch.randn(V)
    y = torch.tensor([0, 1, 2, 3, 0, 7])
    s1, s2 = LogUniformSampler(V, seed=3), LogUniformSampler(V, seed=3)
    loss = float(sampled_softmax_loss(x, y, W, b, s1, n))
    ids, tries = s2.sample(n)
    q_true, q_s = s2.expected_count(y, n, tries), s2.expected_count(ids, n, tries)
    total = 0.0
    for i in range(N):
        logits = [float(x[i] @ W[y[i]] + b[y[i]] - torch.log(q_true[i]))]
        for k, j in enumerate(ids.tolist()):
            logits.append(-np.inf if j == int(y[i]) else float(x[i] @ W[j] + b[j] - torch.log(q_s[k])))
        logits = np.array(logits)
        total += -(logits[0] - np.log(np.exp(logits - logits.max()).sum()) - logits.max())
    assert math.isclose(loss, total / N, rel_tol=1e-5)


def _sampled_softmax_autograd(x, y, W, b, sampler, n):
    """The same loss written with plain autograd ops (masked copy, concatenation,
    cross_entropy): what the fused _SampledSoftmaxCE must equal, value and gradients."""
    N = y.numel()
    ids, tries = sampler.sample(n)
    all_ids = torch.cat([y, ids])
    log_q = torch.log(sampler.expected_count(all_ids, n, tries)).to(x.dtype)
    w, bias = W[all_ids], b[all_ids] - log_q
    true = (x * w[:N]).sum(1) + bias[:N]
    sampled = (x @ w[N:].t() + bias[N:]).masked_fill(y[:, None] == ids[None, :], -3.4e38)
    return torch.nn.functional.cross_entropy(torch.cat([true[:, None], sampled], 1),
                                             torch.zeros_like(y))


def test_fused_sampled_softmax_equals_autograd_formula_with_accidental_hits():
    torch.manual_seed(3)
    V, P, N, n = 40, 6, 300, 25
    x = torch.randn(N, P, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, P, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    y = LogUniformSampler(V, seed=4).draw(N)          # frequent classes: many accidental hits
    fused = sampled_softmax_loss(x, y, W, b, LogUniformSampler(V, seed=5), n)
    ref = _sampled_softmax_autograd(x, y, W, b, LogUniformSampler(V, seed=5), n)
    ids, _ = LogUniformSampler(V, seed=5).sample(n)
    assert int((y[:, None] == ids[None, :]).sum()) > 50           # the hits really occur
    g_fused = torch.autograd.grad(2.5 * fused, [x, W, b], retain_graph=True)
    g_ref = torch.autograd.grad(2.5 * ref, [x, W, b])
    assert abs(float(fused.detach()) - float(ref.detach())) < 1e-10
    for a, r in zip(g_fused, g_ref):
        assert torch.allclose(a, r, rtol=0, atol=1e-12), float((a - r).abs().max())
    with pytest.raises(RuntimeError, match="backward twice"):     # the logits were consumed
        torch.autograd.grad(fused, [x])
    # fp32 inputs (the training dtype) agree with the fp64 formula to fp32 rounding
    loss32 = sampled_softmax_loss(x.detach().float(), y, W.detach().float(), b.detach().float(),
                                  LogUniformSampler(V, seed=5), n)
    assert loss32.dtype == torch.float32 and abs(float(loss32) - float(ref.detach())) < 1e-5


def test_sparse_softmax_gradient_gives_the_dense_update():
    """Row-sparse softmax gradients (LanguageModel.sparse_softmax) change the cost of clipping and
    Adagrad, not the update: three steps equal the dense-gradient steps, weights and optimizer."""
    from torch_elmo.config import preset
    V, B, T, n = 300, 4, 5, 40
    options = preset("tiny")
    torch.manual_seed(0)
    lms = [LanguageModel(options, V)]
    lms.append(LanguageModel(options, V, sparse_softmax=False))
    lms[1].load_state_dict(lms[0].state_dict())
    opts = [make_optimizer(list(lm.parameters()), 0.2) for lm in lms]
    samplers = [LogUniformSampler(V, seed=1), LogUniformSampler(V, seed=1)]
    g = torch.Generator().manual_seed(5)
    C = options.char_cnn.max_characters_per_token
    W0 = lms[0].softmax_W.detach().clone()
    for step in range(3):
        batch = {k: torch.randint(1, 200, (B, T, C), generator=g) for k in ("fwd_chars", "bwd_chars")}
        batch.update({k: LogUniformSampler(V, seed=step).draw(B * T).reshape(B, T)
                      for k in ("fwd_targets", "bwd_targets")})
        norms = []
        for lm, opt, sampler in zip(lms, opts, samplers):
            lm.eval()                       # no dropout: the two runs see the same network
            torch.manual_seed(step)
            loss, _, _ = lm.training_loss(batch, lm.zero_state(B), sampler, n)
            opt.zero_grad(set_to_none=True)
            (loss * T).backward()
            assert lm.softmax_W.grad.is_sparse == lm.sparse_softmax
            norms.append(clip_by_global_norm(list(lm.parameters()), 1.0))
            opt.step()
        assert norms[0] > 1.0 and math.isclose(norms[0], norms[1], rel_tol=1e-6)   # clipped
    for (name, a), (_, b) in zip(lms[0].named_parameters(), lms[1].named_parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (name, float((a - b).abs().max()))
    untouched = (opts[0].state[lms[0].softmax_W]["sum"] == 1.0).all(1)
    assert 0 < int(untouched.sum()) < V                                 # rows never sampled
    assert torch.equal(lms[0].softmax_W[untouched], W0[untouched])
    assert (lms[0].softmax_W[~untouched] != W0[~untouched]).any(1).all()
    for p0, p1 in zip(lms[0].parameters(), lms[1].parameters()):
        assert torch.allclose(opts[0].state[p0]["sum"], opts[1].state[p1]["sum"], rtol=1e-6)
