"""The fast paths (kernels.py: packed layout, directions on two threads, oneDNN, hand-written
BPTT, bf16; model.py's deduplicated and window-trimmed char CNN) against the plain step-by-step
reference in tests/reference.py, and the device seam's plain math (kernels.lstmp_reference)
against the CPU paths: equal within 1e-5 in fp32, for inference and for training gradients."""
import copy
import pickle
import random

import pytest
import torch

from reference import reference_char_cnn, reference_forward, reference_run_direction
from torch_elmo import BiLM, batch_to_ids, kernels, preset
from torch_elmo.model import CharCNN

ATOL = 1e-5


def _words(n, seed):
    rng = random.Random(seed)
    vocab = ["the", "a", ",", ".", "plane", "x", "flies", "<S>", "</S>", "é" * 30, "z" * 60,
             "ab" * 24, "q" * 47, "Z" * 48]
    vocab += ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 12))) for _ in range(20)]
    return [rng.choice(vocab) for _ in range(n)]


SENTENCE_LENGTHS = [0, 1, 5, 12, 12, 3, 9, 2]


def _batch(seed=0, lengths=SENTENCE_LENGTHS):
    return [_words(n, seed * 100 + i) for i, n in enumerate(lengths)]


def _model(skip=True, n_layers=2, cell_clip=3.0, proj_clip=3.0, n_highway=2, seed=0):
    options = preset("tiny")
    options.lstm.use_skip_connections = skip
    options.lstm.n_layers = n_layers
    options.lstm.cell_clip = cell_clip
    options.lstm.proj_clip = proj_clip
    options.char_cnn.n_highway = n_highway
    torch.manual_seed(seed)
    model = BiLM(options).eval()
    with torch.no_grad():  # non-zero biases so every term is exercised; big enough to clip
        for cell in list(model.forward_layers) + list(model.backward_layers):
            cell.bias.normal_(0, 0.5)
            cell.proj_weight.mul_(4.0)
        for conv in model.char_cnn.convs:
            conv.bias.normal_(0, 0.1)
    return model


def _random_state(model, B, seed):
    g = torch.Generator().manual_seed(seed)
    c, h = model.zero_state(B)
    return torch.randn(c.shape, generator=g) * 2, torch.randn(h.shape, generator=g)


def _assert_dicts_close(got, want, atol=ATOL):
    torch.testing.assert_close(got["token_embedding"], want["token_embedding"], atol=atol, rtol=0)
    assert len(got["layers"]) == len(want["layers"])
    for g, w in zip(got["layers"], want["layers"]):
        torch.testing.assert_close(g, w, atol=atol, rtol=0)
    assert torch.equal(got["mask"], want["mask"])
    for g, w in zip(got["state"], want["state"]):
        torch.testing.assert_close(g, w, atol=atol, rtol=0)


@pytest.mark.parametrize("skip,n_layers,cell_clip", [(True, 2, 3.0), (False, 2, 3.0),
                                                     (True, 3, None), (False, 1, 3.0)])
def test_fast_inference_equals_reference(skip, n_layers, cell_clip):
    model = _model(skip, n_layers, cell_clip)
    ids = batch_to_ids(_batch(), add_boundaries=True)
    state = _random_state(model, ids.shape[0], 1)
    with torch.no_grad():
        want = reference_forward(model, ids, state)
        got = model(ids, state)
        got_zero = model(ids)
    _assert_dicts_close(got, want)
    _assert_dicts_close(got_zero, reference_forward(model, ids))
    # padding positions exactly zero; the clips really bite in this model
    mask = want["mask"]
    for layer in got["layers"][1:]:
        assert layer[~mask].abs().max() == 0
    c_max, h_max = (s.abs().max() for s in got_zero["state"])
    assert (c_max == 3.0) if cell_clip is not None else (c_max > 3.0)
    assert h_max == 3.0


@pytest.mark.parametrize("lengths", [[7], [1, 1, 1], [4, 0, 2], [3, 3]])
def test_fast_inference_lengths(lengths):
    model = _model()
    ids = batch_to_ids(_batch(3, lengths), add_boundaries=True)
    with torch.no_grad():
        _assert_dicts_close(model(ids), reference_forward(model, ids))


def test_fast_inference_carried_state_over_batches():
    """Three calls with the state carried, as the embedder does."""
    model = _model()
    state_fast = state_ref = None
    for k in range(3):
        ids = batch_to_ids(_batch(k), add_boundaries=True)
        with torch.no_grad():
            got = model(ids, state_fast)
            want = reference_forward(model, ids, state_ref)
        _assert_dicts_close(got, want)
        state_fast, state_ref = got["state"], want["state"]


def test_bf16_autocast_runs_close_to_fp32():
    model = _model()
    ids = batch_to_ids(_batch(), add_boundaries=True)
    with torch.no_grad():
        want = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(ids)
    for g, w in zip(got["layers"], want["layers"]):
        assert g.dtype == torch.float32
        assert (g - w).abs().max() < 0.15
        assert (g - w).abs().max() > 0          # it really ran in bf16


def test_fp16_activation_path_runs_close_to_fp32(monkeypatch):
    """fp16 is what CUDA autocast(float16) selects (`kernels.inference_dtype`); no GPU here, so the same
    path (fp16 weights and activations, fp32 cell state) runs on the CPU's fp16 kernels."""
    model = _model()
    ids = batch_to_ids(_batch(), add_boundaries=True)
    with torch.no_grad():
        want = model(ids)
        monkeypatch.setattr(kernels, "inference_dtype", lambda device: torch.float16)
        got = model(ids)
    for g, w in zip(got["layers"][1:], want["layers"][1:]):
        assert g.dtype == torch.float32
        assert 0 < (g - w).abs().max() < 0.02
    assert got["state"][0].dtype == torch.float32


@pytest.mark.parametrize("bf16", [False, True])
def test_directions_on_two_threads_equal_one_thread(bf16, monkeypatch):
    """With 2+ threads each direction runs on its own thread (kernels.lstmp_layer); the
    results equal the serial path exactly, bf16 autocast included (autocast is per thread), and
    the caller's thread count is restored."""
    model = _model()
    ids = batch_to_ids(_batch(seed=3), add_boundaries=True)
    state = _random_state(model, ids.shape[0], 1)
    calls = []
    real = kernels.infer_layer
    monkeypatch.setattr(kernels, "infer_layer", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            got = model(ids, state)
            assert torch.get_num_threads() == 2
            monkeypatch.setenv("TORCH_ELMO_SERIAL_DIRECTIONS", "1")
            want = model(ids, state)
    finally:
        torch.set_num_threads(n)
    assert calls == [1, 1, 1, 1, 2, 2]          # 2 layers x 2 threaded directions, then serial
    _assert_dicts_close(got, want, atol=0)
    assert got["layers"][1].dtype == torch.float32


def test_every_kernel_choice_equals_reference(monkeypatch):
    """Every combination of the fp32 candidates autotune.py may pick (kernels.CANDIDATES), and
    block_mb=0 (one step per hoisted block: the block split path on a tiny model), against the
    reference, with a carried state and rows of different lengths; and lstmp_layer runs the
    choices that kernels.TUNED holds for the layer's shape class."""
    import itertools
    from dataclasses import fields
    model = _model()
    ids = batch_to_ids(_batch(seed=5), add_boundaries=True)
    state = _random_state(model, ids.shape[0], 2)
    with torch.no_grad():
        want = reference_forward(model, ids, state)
    names = [f.name for f in fields(kernels.Choices)]
    assert sorted(kernels.CANDIDATES) == sorted(names)
    assert all(kernels.CANDIDATES[k][0] == getattr(kernels.DEFAULT, k) for k in names)
    values = [kernels.CANDIDATES[k] + ((0,) if k == "block_mb" else ()) for k in names]
    seen = set()
    real = kernels.infer_layer
    monkeypatch.setattr(kernels, "infer_layer",
                        lambda *a, **k: seen.add(a[-1] if len(a) > 7 else None) or real(*a, **k))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for combo in itertools.product(*values):
            ch = kernels.Choices(**dict(zip(names, combo)))
            shape = kernels.shape_class(model.forward_layers[0])
            monkeypatch.setitem(kernels.TUNED, shape, ch)
            for cell in list(model.forward_layers) + list(model.backward_layers):
                cell.fast_weights.clear()
            with torch.no_grad():
                got = model(ids, state)
            _assert_dicts_close(got, want)
            assert ch in seen, ch                 # the loop really ran with these choices
    finally:
        torch.set_num_threads(n)
    assert len(seen) == 2 * 2 * 2 * 2 * 3


@pytest.mark.parametrize("skip,cell_clip,proj_clip", [(True, 3.0, 3.0), (False, None, None),
                                                      (True, 3.0, None)])
def test_training_gradients_equal_reference(skip, cell_clip, proj_clip):
    """run_direction under autograd (dropout off): outputs, final state and the gradients of
    every LSTM parameter, the input and the initial state, against autograd through the
    reference, for rows of different lengths (0 included) in both directions."""
    model = _model(skip, 2, cell_clip, proj_clip)
    model.train()
    model.dropout = 0.0
    B, T, P = 6, 9, model.proj_dim
    lengths = torch.tensor([9, 0, 4, 9, 1, 6])
    valid = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(B, T, P, generator=g) * valid.unsqueeze(2)
    c00, h00 = _random_state(model, B, 6)
    # upstream gradients scaled so that the parameter gradients are O(1)
    w_out = [torch.randn(B, T, P, generator=g) * 0.02 for _ in range(model.n_layers)]
    w_c, w_h = (torch.randn(s.shape[1:], generator=g) * 0.02 for s in (c00, h00))
    for d in range(2):
        results = []
        for fn in (model.run_direction, lambda d, x, v, c, h: reference_run_direction(
                model, d, x, lengths, c, h)):
            model.zero_grad()
            x = x0.clone().requires_grad_()
            c0, h0 = c00[d].clone().requires_grad_(), h00[d].clone().requires_grad_()
            outs, c, h = fn(d, x, valid, c0, h0)
            loss = sum((o * w).sum() for o, w in zip(outs, w_out)) + (c * w_c).sum() + (h * w_h).sum()
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.directions[d].named_parameters()}
            results.append(([o.detach() for o in outs], c.detach(), h.detach(), x.grad, c0.grad,
                            h0.grad, grads))
        (o1, c1, h1, gx1, gc1, gh1, gp1), (o2, c2, h2, gx2, gc2, gh2, gp2) = results
        for a, b in zip(o1 + [c1, h1, gx1, gc1, gh1], o2 + [c2, h2, gx2, gc2, gh2]):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        assert gp1.keys() == gp2.keys()
        for name in gp1:
            torch.testing.assert_close(gp1[name], gp2[name], atol=ATOL, rtol=0)
        assert gx1.abs().max() > 0 and gc1.abs().max() > 0


def test_training_forward_equals_reference_with_grad():
    """BiLM.forward under autograd (the differentiable path) equals the reference too."""
    model = _model()
    ids = batch_to_ids(_batch(), add_boundaries=True)
    state = _random_state(model, ids.shape[0], 2)
    got = model(ids, state)
    assert got["layers"][2].requires_grad
    with torch.no_grad():
        want = reference_forward(model, ids, state)
    _assert_dicts_close({k: (v if k == "mask" else [t.detach() for t in v] if k != "token_embedding"
                             else v.detach()) for k, v in got.items()}, want)


@pytest.mark.parametrize("chunk", [3, 256])
def test_char_cnn_dedup_and_trimmed_windows_exact(chunk, monkeypatch):
    """Distinct tokens only, windows touching real characters only: same values and the same
    gradients as convolving every position (tokens from 1 to 48 bytes, padding, repeats)."""
    monkeypatch.setattr(CharCNN, "CHUNK", chunk)
    model = _model(n_highway=1)
    model.train()
    cnn = model.char_cnn
    ids = batch_to_ids(_batch(1) + [["ab" * 30, "<S>", "x"], ["q" * 46, "q" * 47]],
                       add_boundaries=True)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(*ids.shape[:2], cnn.output_dim, generator=g)
    grads = []
    for fn in (cnn, lambda i: reference_char_cnn(cnn, i)):
        cnn.zero_grad()
        out = fn(ids)
        (out * w).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in cnn.named_parameters()}))
    (a, ga), (b, gb) = grads
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-4, rtol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(cnn(ids), b, atol=ATOL, rtol=0)


def test_inference_cache_follows_weight_updates_and_pickles():
    model = _model()
    ids = batch_to_ids(_batch(), add_boundaries=True)
    with torch.no_grad():
        model(ids)                                  # fills the prepacked-weight cache
        model.forward_layers[1].state_weight.mul_(0.5)
        model.char_cnn.highways[0].carry.weight.add_(0.01)
        model.char_cnn.convs[2].weight.mul_(1.5)
        _assert_dicts_close(model(ids), reference_forward(model, ids))
    clone = copy.deepcopy(model)
    restored = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        _assert_dicts_close(clone(ids), reference_forward(model, ids))
        _assert_dicts_close(restored(ids), reference_forward(model, ids))
    sd = {k: v * 0.9 for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    with torch.no_grad():
        _assert_dicts_close(model(ids), reference_forward(model, ids))


def test_unique_rows():
    ids = batch_to_ids(_batch(2), add_boundaries=True).reshape(-1, 50)
    uniq, inverse = kernels.unique_rows(ids)
    assert torch.equal(uniq[inverse], ids)
    assert uniq.shape[0] == torch.unique(ids, dim=0).shape[0]


def _packed_case(model, seed):
    """A layer-0 cell of each direction, packed inputs and sorted states of rows of lengths
    9, 0, 4, 9, 1, 6 (the backward direction through bwd_index)."""
    B, T, P = 6, 9, model.proj_dim
    lengths = torch.tensor([9, 0, 4, 9, 1, 6])
    pk = kernels.Packing(torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, P, generator=g)
    c0, h0 = _random_state(model, B, seed)
    xs = [pk.pack(x, pk.fwd_index), pk.pack(x, pk.bwd_index)]
    c0s = [c0[d, 0].index_select(0, pk.order) for d in range(2)]
    h0s = [h0[d, 0].index_select(0, pk.order) for d in range(2)]
    return [model.forward_layers[0], model.backward_layers[0]], xs, pk, c0s, h0s


@pytest.mark.parametrize("cell_clip,proj_clip", [(3.0, 3.0), (None, None)])
def test_plain_math_equals_cpu_inference(cell_clip, proj_clip):
    """kernels.lstmp_reference (what the device seam runs off the CPU) against the CPU inference
    loop (in place, tanh via sigmoid, prepacked weights), one thread and two."""
    model = _model(cell_clip=cell_clip, proj_clip=proj_clip)
    cells, xs, pk, c0s, h0s = _packed_case(model, 1)
    n = torch.get_num_threads()
    with torch.no_grad():
        want = [kernels.lstmp_reference(*a) for a in zip(cells, xs, [pk] * 2, c0s, h0s)]
        for threads in (1, 2):
            try:
                torch.set_num_threads(threads)
                got = kernels.lstmp_layer(cells, xs, pk, c0s, h0s)
            finally:
                torch.set_num_threads(n)
            for k in range(3):
                for d in range(2):
                    torch.testing.assert_close(got[k][d], want[d][k], atol=ATOL, rtol=0)


def test_plain_math_equals_cpu_training_gradients():
    """kernels.lstmp_reference under autograd against LSTMPFunction (hand-written BPTT): the
    outputs, final state and the gradients of the input, the initial state and every weight."""
    model = _model()
    cells, xs0, pk, c00s, h00s = _packed_case(model, 2)
    g = torch.Generator().manual_seed(4)
    w_y = torch.randn(pk.N, model.proj_dim, generator=g) * 0.02
    results = []
    for fn in (lambda *a: kernels.lstmp_layer([a[0]], [a[1]], a[2], [a[3]], [a[4]]),
               lambda *a: [[t] for t in kernels.lstmp_reference(*a)]):
        model.zero_grad()
        x, c0, h0 = (t.clone().requires_grad_() for t in (xs0[1], c00s[1], h00s[1]))
        (y,), (c,), (h,) = fn(cells[1], x, pk, c0, h0)
        ((y * w_y).sum() + (c * 0.1).sum() + (h * 0.3).sum()).backward()
        results.append([y.detach(), c.detach(), h.detach(), x.grad, c0.grad, h0.grad]
                       + [p.grad.clone() for p in cells[1].parameters()])
    assert results[0][3].abs().max() > 0
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_packing_of_a_mask_with_holes():
    """A row's k-th step is its k-th valid position, forwards (fwd_index) and backwards
    (bwd_index); rows sorted by their number of valid positions; for a prefix mask step k is
    position k."""
    valid = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    pk = kernels.Packing(valid)
    assert pk.order.tolist() == [3, 0, 1, 2] and pk.batch_sizes == [3, 3, 2, 1]
    T = 4
    assert pk.fwd_index.tolist() == [3 * T + 0, 0 * T + 0, 1 * T + 0, 3 * T + 1, 0 * T + 2,
                                     1 * T + 1, 3 * T + 2, 0 * T + 3, 3 * T + 3]
    assert pk.bwd_index.tolist() == [3 * T + 3, 0 * T + 3, 1 * T + 1, 3 * T + 2, 0 * T + 2,
                                     1 * T + 0, 3 * T + 1, 0 * T + 0, 3 * T + 0]
    prefix = kernels.Packing(torch.arange(T).unsqueeze(0) < valid.sum(1, keepdim=True))
    assert prefix.fwd_index.tolist() == [3 * T + 0, 0 * T + 0, 1 * T + 0, 3 * T + 1, 0 * T + 1,
                                         1 * T + 1, 3 * T + 2, 0 * T + 2, 3 * T + 3]
