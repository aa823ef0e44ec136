"""torch_elmo.metrics: metrics.jsonl survives a line cut by a kill; the plot is written atomically."""
import json

from torch_elmo.metrics import append_jsonl, fmt_time, plot_perplexity, read_metrics


def test_metrics_jsonl_round_trip_skips_a_cut_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    for step in (1, 2, 3):
        append_jsonl(str(p), {"step": step, "tokens": 10 * step, "train_ppl": 100.0 / step})
    with open(p, "a") as f:
        f.write('{"step": 4, "tok')                        # a kill in the middle of a line
    assert [m["step"] for m in read_metrics(str(p))] == [1, 2, 3]
    assert [m["step"] for m in read_metrics(str(p), max_step=2)] == [1, 2]
    assert json.loads(p.read_text().splitlines()[0])["tokens"] == 10


def test_plot_writes_a_png_and_no_temporary(tmp_path):
    metrics = [{"step": s, "tokens": 100 * s, "train_ppl": 50.0 / s, "heldout_ppl_fwd": 60.0 / s,
                "heldout_ppl_bwd": 62.0 / s, "heldout_ppl_avg": 61.0 / s} for s in (1, 2, 3)]
    path = tmp_path / "perplexity.png"
    assert plot_perplexity(metrics, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["perplexity.png"]


def test_fmt_time():
    assert fmt_time(3725.9) == "1:02:05"
