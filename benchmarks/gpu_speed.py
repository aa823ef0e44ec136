"""ELMo on one GPU: inference and training tokens/s of the original model

    python benchmarks/gpu_speed.py                       # on a CUDA machine (the device tool)
    python benchmarks/gpu_speed.py --device cpu --preset tiny --vocab 5000 --negatives 100 --steps 2  # smoke

In ONE run: the device's matmul peak (fp32, TF32, bf16, fp16: large square torch.mm), then

  inference   BiLM.forward, batch --infer-batch sentences of mean length ~22 words (speed.py's
              made-up Zipf corpus), fp32 / bf16 / fp16 autocast; words per second
  training    LanguageModel.training_loss (char CNN, both LSTM stacks, the fused sampled softmax
              of torch_elmo.train with --negatives negatives out of --vocab words), backward of
              loss x unroll, clip, Adagrad: exactly the step of train.train(); B x T = --batch x
              --unroll target tokens per direction; fp32 and bf16 autocast

and the time that 10 epochs of the 1B Word Benchmark (7.7B tokens) would take at that rate
(the issue's goal: under a day, i.e. >= 90,000 tokens/s). Every mode runs in its own try block:
one that fails (e.g. out of memory) prints its error and the others still run. Random weights;
timings after --warmup untimed steps, CUDA synchronised around every timed region.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from speed import Corpus, forward_flops  # noqa: E402
from torch_elmo import BiLM, batch_to_ids, preset  # noqa: E402
from torch_elmo.lm import LanguageModel, LogUniformSampler  # noqa: E402
from torch_elmo.train import clip_by_global_norm, make_optimizer  # noqa: E402

ONE_B_WORDS_10_EPOCHS = 7.7e9
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, mode: str):
    dt = DTYPES[mode]
    return torch.autocast(device.type, dtype=dt) if dt is not None else torch.autocast(
        device.type, enabled=False)


def matmul_peak(device: torch.device) -> dict:
    n = 8192 if device.type == "cuda" else 2048
    out = {}
    for name, dt, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                           ("bf16", torch.bfloat16, False), ("fp16", torch.float16, False)):
        if device.type == "cpu" and name in ("tf32", "fp16"):
            continue
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(5):
            _sync(device)
            t = time.perf_counter()
            for _ in range(10):
                torch.mm(a, b)
            _sync(device)
            best = min(best, (time.perf_counter() - t) / 10)
        out[name] = 2 * n ** 3 / best / 1e9
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def bench_inference(options, device, corpus, batch: int, n_batches: int, warmup: int, mode: str):
    model = BiLM(options).to(device).eval()
    C = options.char_cnn.max_characters_per_token
    batches = [batch_to_ids(corpus.batch(batch), C, add_boundaries=True).to(device)
               for _ in range(warmup + n_batches)]
    words = sum(int((b > 0).any(2).sum()) - 2 * b.shape[0] for b in batches[warmup:])
    positions = sum(int((b > 0).any(2).sum()) for b in batches[warmup:])
    with torch.no_grad(), _autocast(device, mode):
        for b in batches[:warmup]:
            model(b)
        _sync(device)
        t = time.perf_counter()
        for b in batches[warmup:]:
            model(b)
        _sync(device)
    s = time.perf_counter() - t
    return {"words_per_s": words / s, "positions_per_s": positions / s}


def bench_training(options, device, corpus, B: int, T: int, V: int, n_neg: int, steps: int,
                   warmup: int, mode: str):
    torch.manual_seed(0)
    lm = LanguageModel(options, V).to(device).train()
    sampler = LogUniformSampler(V, seed=0)
    params = list(lm.parameters())
    opt = make_optimizer(params, 0.2)
    C = options.char_cnn.max_characters_per_token

    def make_batch():
        out = {"n_tokens": B * T}
        for d in ("fwd", "bwd"):
            words = [corpus.words[i] for i in corpus.ids(B * T)]
            out[f"{d}_chars"] = batch_to_ids([words[r * T:(r + 1) * T] for r in range(B)],
                                             C).to(device)
            out[f"{d}_targets"] = (torch.tensor(corpus.ids(B * T)) % V).reshape(B, T).to(device)
        return out

    batches = [make_batch() for _ in range(min(warmup + steps, 8))]
    state = lm.zero_state(B)
    state = (state[0].to(device), state[1].to(device))
    seconds = 0.0
    for i in range(warmup + steps):
        _sync(device)
        t = time.perf_counter()
        with _autocast(device, mode):
            loss, _, new_state = lm.training_loss(batches[i % len(batches)], state, sampler, n_neg)
        state = (new_state[0].detach(), new_state[1].detach())
        opt.zero_grad(set_to_none=True)
        (loss * T).backward()
        clip_by_global_norm(params, options.all_clip_norm_val)
        opt.step()
        _sync(device)
        if i >= warmup:
            seconds += time.perf_counter() - t
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return {"tokens_per_s": B * T * steps / seconds, "seconds_per_step": seconds / steps,
            "loss": float(loss.detach()), "max_memory_gib": mem}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="original")
    ap.add_argument("--batch", type=int, default=128, help="training rows per direction")
    ap.add_argument("--unroll", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=793_471, help="softmax size (1B Word: 793,471)")
    ap.add_argument("--negatives", type=int, default=8192)
    ap.add_argument("--infer-batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["fp32", "bf16", "fp16"], choices=list(DTYPES))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    options = preset(args.preset)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {device} ({name}), preset {args.preset}")
    peak = matmul_peak(device)
    print("matmul peak (GFLOP/s): " + ", ".join(f"{k} {v:,.0f}" for k, v in peak.items()))
    fl = forward_flops(options)
    per_pos = sum(fl.values())
    corpus = Corpus()
    modes = [m for m in args.modes if not (device.type == "cpu" and m == "fp16")]
    for batch in args.infer_batch:
        for mode in modes:
            try:
                r = bench_inference(options, device, corpus, batch, max(2, args.steps // 2),
                                    args.warmup, mode)
                gf = r["positions_per_s"] * per_pos / 1e9
                print(f"inference batch {batch:4d} {mode}: {r['words_per_s']:10,.0f} words/s "
                      f"{gf:9,.0f} GFLOP/s ({100 * gf / peak.get(mode, peak['fp32']):.1f}% of "
                      f"{mode} peak)")
            except Exception as e:  # noqa: BLE001  (report and go on with the other modes)
                print(f"inference batch {batch} {mode}: FAILED {type(e).__name__}: {e}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    P = options.lstm.projection_dim
    per_token = 3 * (2 * (fl["char_cnn"] + fl["highway"] + fl["projection"]) + fl["lstm"]
                     + 2 * 2 * P * (args.negatives + 1))
    for mode in modes:
        if mode == "fp16":
            continue   # fp16 training needs loss scaling; bilm-tf trained in fp32
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            r = bench_training(options, device, corpus, args.batch, args.unroll, args.vocab,
                               args.negatives, args.steps, args.warmup, mode)
            gf = r["tokens_per_s"] * per_token / 1e9
            days = ONE_B_WORDS_10_EPOCHS / r["tokens_per_s"] / 86400
            mem = f", max memory {r['max_memory_gib']:.1f} GiB" if r["max_memory_gib"] else ""
            print(f"training {args.batch}x{args.unroll} {mode}: {r['tokens_per_s']:10,.0f} "
                  f"tokens/s, {1000 * r['seconds_per_step']:.0f} ms/step, {gf:,.0f} GFLOP/s "
                  f"({100 * gf / peak.get(mode, peak['fp32']):.1f}% of {mode} peak){mem}; 10 "
                  f"epochs of 1B Word: {days:.2f} days (goal < 1: >= 90,000 tokens/s); "
                  f"loss {r['loss']:.2f}")
        except Exception as e:  # noqa: BLE001
            print(f"training {mode}: FAILED {type(e).__name__}: {e}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
