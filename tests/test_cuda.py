"""CUDA: the model, the embedders and a training step on the GPU agree with the CPU.

Marked `cuda`: they skip without a CUDA device (this machine, CI) and run on a lent GPU through
benchmarks/device_check.sh (`pytest -m cuda`). Tiny random models only (no ../shared needed).
TF32 is switched off so fp32 on the GPU is comparable with the CPU to float32 noise."""
import numpy as np
import pytest
import torch

from torch_elmo import ElmoEmbedder, batch_to_ids, load, preset
from torch_elmo.export import export_model
from torch_elmo.lm import LanguageModel

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SENTENCES = [["The", "cat", "sat", "on", "the", "mat", "."], ["Hello", "world"],
             ["A", "much", "longer", "sentence", "with", "several", "words", "in", "it", "."]]


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def model_dir(tmp_path, tiny_model):
    export_model(tiny_model, tmp_path / "m")
    return tmp_path / "m"


def test_bilm_forward_matches_cpu(tiny_model):
    ids = batch_to_ids(SENTENCES)
    with torch.no_grad():
        cpu = tiny_model(ids)
        gpu = tiny_model.to("cuda")(ids.to("cuda"))
    assert gpu["token_embedding"].device.type == "cuda"
    pairs = [(cpu["token_embedding"], gpu["token_embedding"])] + list(zip(cpu["layers"], gpu["layers"]))
    for a, b in pairs:
        assert torch.allclose(a, b.cpu(), atol=1e-5)


@pytest.mark.parametrize("state", ["zero", "warm", "carry"])
def test_embedder_on_cuda_matches_cpu(model_dir, state):
    cpu = ElmoEmbedder(str(model_dir), state=state)
    gpu = ElmoEmbedder(str(model_dir), state=state, device="cuda")
    for _ in range(2):                          # carry: the second call reads the carried state
        for a, b in zip(cpu.embed_batch(SENTENCES), gpu.embed_batch(SENTENCES)):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_hub_style_call_on_cuda(model_dir):
    cpu, gpu = load(model_dir), load(model_dir, device="cuda")
    text = [" ".join(s) for s in SENTENCES]
    a, b = cpu(text), gpu(text)
    for k in ("elmo", "default", "word_emb", "lstm_outputs1", "lstm_outputs2"):
        assert b[k].device.type == "cuda"
        assert torch.allclose(a[k], b[k].cpu(), atol=1e-5), k


def test_bf16_autocast_inference_is_close(model_dir):
    m = load(model_dir, device="cuda")
    text = [" ".join(s) for s in SENTENCES]
    ref = m(text)["elmo"]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = m(text)["elmo"]
    cos = torch.nn.functional.cosine_similarity(ref.float().flatten(1), low.float().flatten(1))
    assert cos.min() > 0.999


def _batch(vocab_size, B=4, T=5, C=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    chars = torch.randint(1, 262, (B, T, C), generator=g)
    return {"fwd_chars": chars, "bwd_chars": chars.flip(1),
            "fwd_targets": torch.randint(0, vocab_size, (B, T), generator=g),
            "bwd_targets": torch.randint(0, vocab_size, (B, T), generator=g)}


def test_training_step_gradients_match_cpu():
    torch.manual_seed(0)
    V = 50
    lm = LanguageModel(preset("tiny"), V, sparse_softmax=False).eval()   # no dropout: same math
    batch = _batch(V)
    grads = []
    for device in ("cpu", "cuda"):
        m = lm.to(device)
        m.zero_grad()
        b = {k: v.to(device) for k, v in batch.items()}
        state = m.zero_state(4)
        state = tuple(s.to(device) for s in state)
        loss, _, _ = m.training_loss(b, state, None, 0)        # full softmax: deterministic
        (loss * 5).backward()
        grads.append((loss.item(), [p.grad.detach().cpu().clone() for p in m.parameters()]))
    (l_cpu, g_cpu), (l_gpu, g_gpu) = grads
    assert abs(l_cpu - l_gpu) < 1e-5
    for a, b in zip(g_cpu, g_gpu):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_cli_train_on_cuda(tmp_path):
    from torch_elmo import cli
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(" ".join(s) for s in SENTENCES * 20) + "\n")
    vocab = tmp_path / "vocab.txt"
    assert cli.main(["vocab", "--train", str(corpus), "--out", str(vocab)]) == 0
    args = ["train", "--train", str(corpus), "--vocab", str(vocab), "--save-dir",
            str(tmp_path / "run"), "--preset", "tiny", "--batch-size", "4", "--unroll-steps", "5",
            "--n-negative-samples", "8", "--max-tokens", "400", "--device", "cuda",
            "--no-progress"]
    assert cli.main(args) == 0
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert cli.main(["export", "--save-dir", str(tmp_path / "run"), "--out",
                     str(tmp_path / "exp")]) == 0
