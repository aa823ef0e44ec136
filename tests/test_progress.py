"""torch_elmo.progress: a bar on a terminal, plain periodic lines in a log file or pipe, and the
--progress / --no-progress overrides."""
import io

from torch_elmo.progress import ProgressLines, policy, progress_bar, progress_mode


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_mode_follows_the_stream_then_the_policy_then_the_argument():
    log, tty = io.StringIO(), Terminal()
    assert progress_mode(file=log) == "lines" and progress_mode(file=tty) == "bar"
    with policy(True):                     # --progress: a bar in a log file too
        assert progress_mode(file=log) == "bar"
        assert progress_mode(False, file=log) == "off"   # an explicit argument wins
    with policy(False):                    # --no-progress: nothing, even on a terminal
        assert progress_mode(file=tty) == "off"
    assert progress_mode(file=log) == "lines"            # the policy ends with its block


def test_off_a_terminal_periodic_lines_and_no_carriage_returns():
    log = io.StringIO()
    with progress_bar(10, desc="embed", unit="line", every=4, file=log) as bar:
        assert isinstance(bar, ProgressLines)
        for _ in range(10):
            bar.update(1)
    text = log.getvalue()
    assert "\r" not in text
    assert [line.split(" | ")[0] for line in text.splitlines()] == [
        "embed: 4/10 line (40%)", "embed: 8/10 line (80%)"]


def test_on_a_terminal_a_bar_and_nothing_when_disabled():
    tty = Terminal()
    with progress_bar(10, desc="embed", unit="line", file=tty, mininterval=0) as bar:
        for _ in range(10):
            bar.update(1)
    assert "\r" in tty.getvalue() and "10/10" in tty.getvalue()
    quiet = Terminal()
    with progress_bar(10, enabled=False, every=1, interval=0, file=quiet) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""


def test_a_loop_that_logs_its_own_lines_gets_none():
    log = io.StringIO()
    with progress_bar(None, unit="batch", every=None, interval=None, file=log) as bar:
        for _ in range(1000):
            bar.update(1)
            bar.set_postfix(loss="1.0")
    assert log.getvalue() == ""


def test_the_lines_take_tqdms_calls():
    """A loop written for tqdm (bar.n, set_postfix(..., refresh=False), write) runs unchanged."""
    log = io.StringIO()
    with progress_bar(100, desc="predict", unit="B", every=1, file=log) as bar:
        bar.set_postfix(texts=3, refresh=False)
        bar.update(40 - bar.n)
    assert bar.n == 40
    line = log.getvalue().strip()
    assert line.startswith("predict: 40/100 B (40%)") and line.endswith("| texts 3")
