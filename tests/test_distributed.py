"""torch_elmo.distributed: multi-process training on CPU with gloo, launched by torchrun: 2 processes with
per-rank batch b equal 1 process with batch 2b fed the same rows (losses and weights), an exact
--resume with the same world size (through the `elmo train --nproc 2` shortcut), a re-shard when
the world size changes, and a killed rank that ends the job with one clear line, after which
--resume finishes. Every subprocess is bounded by a timeout; each torchrun launch costs seconds
(three Python processes import torch), so the launches are few and the model tiny."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, shared_path
from torch_elmo.config import Options
from torch_elmo.checkpoint import load_checkpoint
from torch_elmo.distributed import all_reduce_gradients
from torch_elmo.train import train
from torch_elmo.vocab import Vocabulary

B, T = 2, 5                 # per-rank batch; 134 tokens // (2 x 5 x 2 ranks) = 6 updates/epoch
LAUNCH_TIMEOUT = 150        # seconds for one torchrun launch on a busy 2-core machine


def tiny_options() -> dict:
    """bilm-tf tests/test_training.py's model, dropout 0: the 2-process and the 1-process runs
    then differ only in how the batch is split (dropout masks are per rank and could not match)."""
    return {"bidirectional": True, "dropout": 0.0,
            "char_cnn": {"activation": "tanh", "embedding": {"dim": 4},
                         "filters": [[1, 8], [2, 8], [3, 16], [4, 32], [5, 64]],
                         "max_characters_per_token": 10, "n_characters": 261, "n_highway": 1},
            "lstm": {"cell_clip": 3, "dim": 16, "n_layers": 2, "proj_clip": 3,
                     "projection_dim": 8, "use_skip_connections": True},
            "all_clip_norm_val": 1.0, "n_epochs": 1, "n_train_tokens": 134, "batch_size": B,
            "unroll_steps": T, "n_negative_samples_batch": 16}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = shared_path("fixtures", "bilm-tf", "train")
    work = tmp_path_factory.mktemp("ddp")
    opts = work / "options.json"
    opts.write_text(json.dumps(tiny_options()))
    return {"data": str(d / "data.txt"), "vocab": str(d / "vocab.txt"), "options": str(opts),
            "work": work}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(nproc: int) -> list[str]:
    """torchrun with an explicit c10d rendezvous on a free port (the multi-node form, one node)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", "-m", "torch_elmo", "train"]


def _train_args(setup, save_dir, *extra) -> list[str]:
    return ["--train", setup["data"], "--vocab", setup["vocab"], "--save-dir", str(save_dir),
            "--options", setup["options"], "--log-every", "1", "--no-progress",
            "--dist-timeout", "30", *extra]


def _run(cmd, timeout=LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _losses(save_dir) -> list[float]:
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["train_loss"] for line in f]


def _max_weight_diff(a: dict, b: dict) -> float:
    diffs = [float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"]]
    diffs += [float((a["softmax"][k] - b["softmax"][k]).abs().max()) for k in ("W", "b")]
    return max(diffs)


@pytest.fixture(scope="module")
def two_process_run(setup):
    """6 updates with 2 processes (1 epoch), then `elmo train --nproc 2 --resume --epochs 2`."""
    save = setup["work"] / "ddp"
    first = _run(_torchrun(2) + _train_args(setup, save, "--epochs", "1"))
    assert first.returncode == 0, first.stdout + first.stderr
    after_first = setup["work"] / "ddp_after_6"
    shutil.copytree(save, after_first)
    second = _run([sys.executable, "-m", "torch_elmo", "train", "--nproc", "2", "--resume",
                   *_train_args(setup, save, "--epochs", "2")])
    assert second.returncode == 0, second.stdout + second.stderr
    return {"save": save, "after_first": after_first, "first": first, "second": second}


def test_two_processes_equal_one_process_with_the_global_batch(setup, two_process_run, tmp_path):
    out = two_process_run["first"].stdout
    assert "batch 2 x unroll 5 x 2 process(es)" in out and "6 updates/epoch" in out
    assert "resumed at step 6" in two_process_run["second"].stdout
    ckpt = load_checkpoint(str(two_process_run["save"]))
    assert ckpt["step"] == 12 and ckpt["tokens"] == 12 * B * T * 2
    assert len(ckpt["ranks"]) == 2                       # both ranks' positions were saved
    assert ckpt["ranks"][0]["data"]["config"]["rank"] == 0
    assert ckpt["ranks"][1]["data"]["config"]["rank"] == 1

    # one process, batch 2b = rank 0's rows then rank 1's rows, 12 updates without a break
    torch.set_num_threads(1)
    options = Options.from_dict(tiny_options()).replace(batch_size=2 * B)
    ref = tmp_path / "ref"
    train(options, Vocabulary.read(setup["vocab"]), [setup["data"]], str(ref), epochs=2,
          n_train_tokens=134, log_every=1, progress=False, _emulate_world_size=2)
    ref_ckpt = load_checkpoint(str(ref))
    assert ref_ckpt["step"] == 12

    got, want = _losses(two_process_run["save"]), _losses(ref)
    assert len(got) == len(want) == 12
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5, (got, want)
    assert _max_weight_diff(ckpt, ref_ckpt) <= 1e-5      # the resume at step 6 was exact
    # and the check can fail: one more update moves the weights by far more than 1e-5
    assert _max_weight_diff(load_checkpoint(str(two_process_run["after_first"])), ref_ckpt) > 1e-4


def test_resume_with_another_world_size_reshards(setup, two_process_run, tmp_path, capsys):
    save = tmp_path / "one"
    shutil.copytree(two_process_run["after_first"], save)   # 2 processes, step 6, 120 tokens
    torch.set_num_threads(1)
    train(Options.from_dict(tiny_options()), Vocabulary.read(setup["vocab"]), [setup["data"]],
          str(save), epochs=2, resume=True, log_every=100, progress=False)
    out = capsys.readouterr().out
    assert "resume: world size 2 -> 1: data re-sharded" in out
    ckpt = load_checkpoint(str(save))
    # 2 epochs at the new global batch of 10 tokens: 26 updates' worth of tokens; 120 were done
    # (12 updates' worth), so 14 more updates
    assert ckpt["step"] == 6 + 14 and ckpt["tokens"] == 120 + 14 * B * T
    assert ckpt["run"]["world_size"] == 1 and ckpt["ranks"] is None


def _children(parent: int) -> list[int]:
    """The pids whose parent is `parent` (read from /proc)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                    out.append(int(pid))
        except OSError:
            continue
    return out


def _worker_pid(parent: int, rank: int, timeout: float = LAUNCH_TIMEOUT) -> int:
    """The pid of torchrun's worker with RANK=rank (its children, found through /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in _children(parent):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under pid {parent}")


def _child_pid(parent: int) -> int:
    children = _children(parent)
    assert children, f"no child of pid {parent}"
    return children[0]


def test_killed_rank_stops_the_job_with_a_clear_message_and_resume_continues(setup, tmp_path):
    save = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(2) + _train_args(setup, save, "--epochs", "10000",
                                                       "--checkpoint-every", "5"),
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        victim = _worker_pid(proc.pid, rank=1)
        deadline = time.time() + LAUNCH_TIMEOUT
        while not (save / "checkpoint.pt").exists():          # mid-run: after a checkpoint
            assert proc.poll() is None and time.time() < deadline, "the run ended early"
            time.sleep(0.2)
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        t_kill = time.time()
        out, _ = proc.communicate(timeout=90)
        waited = time.time() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert waited < 60, f"the job took {waited:.0f} s to end after a rank died"
    assert "elmo train: error: rank 0 lost contact with the group" in out, out[-3000:]
    assert "Traceback" not in out.split("elmo train: error:")[0][-2000:]

    ckpt = load_checkpoint(str(save))
    step, tokens = int(ckpt["step"]), int(ckpt["tokens"])
    assert step % 5 == 0 and step > 0
    resumed = _run(_torchrun(2) + _train_args(setup, save, "--resume", "--epochs", "10000",
                                              "--max-tokens", str(tokens + 3 * B * T * 2)))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed at step {step:,}" in resumed.stdout
    assert "--max-tokens" in resumed.stdout
    assert int(load_checkpoint(str(save))["step"]) == step + 3


@pytest.mark.parametrize("target", ["torchrun", "rank 1 only"])
def test_ctrl_c_stops_every_rank_at_the_same_step_with_a_checkpoint(setup, tmp_path, target):
    """torchrun forwards SIGINT to every worker (a few ms apart); on a multi-node job a Ctrl-C
    may reach one node's ranks only. Either way the ranks decide on the flag as it travels with
    the gradients (a rank acting on a signal that arrived after the all-reduce would stop a step
    early and leave the others waiting: the 30 s 'lost contact' seen before the fix), finish the
    step together, and rank 0 checkpoints all ranks' positions."""
    save = tmp_path / "interrupted"
    proc = subprocess.Popen(_torchrun(2) + _train_args(setup, save, "--epochs", "10000",
                                                       "--checkpoint-every", "5",
                                                       "--log-every", "100000"),
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        rank1 = _worker_pid(proc.pid, rank=1)
        deadline = time.time() + LAUNCH_TIMEOUT
        while not (save / "checkpoint.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended early"
            time.sleep(0.2)
        if target == "torchrun":
            proc.send_signal(signal.SIGINT)
        else:
            os.kill(rank1, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "stopped: interrupted (Ctrl-C); continue with --resume" in out, out[-3000:]
    assert "lost contact" not in out
    ckpt = load_checkpoint(str(save))
    step = int(ckpt["step"])
    assert f"step {step:,}/" in out                       # the checkpoint is of the stop step
    assert [r["data"]["batches"] for r in ckpt["ranks"]] == [step, step]


def test_nproc_below_one_is_refused(setup, capsys):
    from torch_elmo.cli import main
    assert main(["train", *_train_args(setup, "unused", "--nproc", "0")]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err


def test_all_reduce_is_a_no_op_for_one_process():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    extra = torch.tensor([1.0, 0.0])
    assert all_reduce_gradients([p], 1, extra) is extra
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def _h5(path):
    import h5py
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in f}


def test_embed_under_torchrun_equals_one_process(tmp_path, tiny_model):
    from torch_elmo import export_model
    export_model(tiny_model, tmp_path / "m")
    lines = ["the cat sat on the mat", "", "a much longer line with quite a few more words in it",
             "x", "hello world", "one two three four five"] * 3
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "torch_elmo", "embed", "--model", str(tmp_path / "m"), "--input",
            str(inp), "--batch-size", "4", "--no-progress"]
    one = subprocess.run(base + ["--output", str(tmp_path / "one.hdf5")], env=env,
                         capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(base + ["--output", str(tmp_path / "two.hdf5"), "--nproc", "2"], env=env,
                         capture_output=True, text=True, timeout=LAUNCH_TIMEOUT + 60)
    assert two.returncode == 0, two.stderr
    a, b = _h5(tmp_path / "one.hdf5"), _h5(tmp_path / "two.hdf5")
    assert sorted(a) == sorted(b) and len(a) == len(lines) + 1          # + sentence_to_index
    assert a["sentence_to_index"] == b["sentence_to_index"]
    for k in a:
        if k != "sentence_to_index":
            assert a[k].shape == b[k].shape
            np.testing.assert_allclose(a[k], b[k], atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "m", "one.hdf5", "two.hdf5"]
    carry = subprocess.run(base + ["--output", str(tmp_path / "c.hdf5"), "--nproc", "2",
                                   "--state", "carry"], env=env, capture_output=True, text=True,
                           timeout=LAUNCH_TIMEOUT + 60)
    assert carry.returncode != 0 and "carry depends on batch history" in carry.stderr
    assert not (tmp_path / "c.hdf5").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_embed_rank_killed_mid_run_leaves_no_output_and_no_temp_file(tmp_path, tiny_model):
    from torch_elmo import export_model
    export_model(tiny_model, tmp_path / "m")
    rng = np.random.RandomState(0)
    words = [f"w{i}" for i in range(500)]
    inp = tmp_path / "in.txt"          # long enough that the ranks are still embedding when killed
    inp.write_text("".join(" ".join(rng.choice(words, 40)) + "\n" for _ in range(20000)))
    out = tmp_path / "out.hdf5"
    proc = subprocess.Popen([sys.executable, "-m", "torch_elmo", "embed", "--model",
                             str(tmp_path / "m"), "--input", str(inp), "--output", str(out),
                             "--nproc", "2", "--no-progress"], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + LAUNCH_TIMEOUT
        while not [p for p in tmp_path.iterdir() if p.name.startswith(".out.hdf5.")]:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.1)
        victim = _worker_pid(_child_pid(proc.pid), rank=1)     # elmo -> torchrun -> ranks
        time.sleep(1.0)                 # rank 0 wrote the layout; the ranks are embedding
        os.kill(victim, signal.SIGKILL)
        text, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    ours = [ln for ln in text.splitlines() if ln.startswith("elmo embed: error:")]
    assert "elmo embed: error: rank 0 lost contact with the group" in text, text[-3000:]
    assert ours[-1].startswith("elmo embed: error: torchrun with 2 processes exited"), text[-3000:]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "m"]
