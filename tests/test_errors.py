"""torch_elmo.errors: what an error quotes of a library's exception stays one short line."""
import errno

from torch_elmo.errors import QUOTE_LIMIT, one_line, quote

# h5py's RuntimeError when the disk fills under HDF5 (one of the lines `elmo embed` printed)
HDF5_FULL = ("Can't decrement id ref count (file write failed: time = Mon Dec  7 05:32:57 2026\n, "
             "filename = '/tmp/w22/disk/.out.hdf5.12437.1e7f3k5a.tmp', file descriptor = 3, "
             "errno = 28, error message = 'No space left on device', buf = 0x55aecc681d88, total "
             "write size = 1024, bytes this sub-write = 1024, offset = 262144)")


def test_an_errno_buried_in_a_library_message_is_the_cause():
    assert len(HDF5_FULL) > 300
    assert quote(RuntimeError(HDF5_FULL)) == "No space left on device"
    assert quote(OSError(errno.EROFS, "Read-only file system", "/x")) == "Read-only file system"


def test_a_long_message_is_one_capped_line():
    q = quote(ValueError("first line\n" + "word " * 100))
    assert "\n" not in q and len(q) == QUOTE_LIMIT and q.startswith("first line word")
    assert q.endswith("...")
    assert quote(ValueError("short one")) == "short one"
    assert quote(KeyError()) == "KeyError"
    assert one_line("a\nb\r\nc") == "a b c"


def test_short_path_keeps_the_name_and_cuts_the_middle(tmp_path, monkeypatch):
    from torch_elmo.errors import short_path
    monkeypatch.chdir(tmp_path)
    assert short_path(str(tmp_path / "data" / "a.txt")) == "data/a.txt"
    deep = "/" + "/".join(["directory"] * 12) + "/train-00001.txt"
    s = short_path(deep)
    assert s.startswith(".../") and s.endswith("/directory/train-00001.txt") and len(s) <= 60
