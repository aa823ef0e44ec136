"""tasks/saved.py: the saved task model directory: task.json with a sha256 per file, written
atomically (an existing model survives a failed save), every bad directory refused in one line
at load; a task directory refused by torch_elmo.load; `import torch_elmo` stays light."""
import json
import os
import subprocess
import sys

import pytest

import torch_elmo
from torch_elmo import ElmoError, export_model
from torch_elmo.tasks import saved


def write_one(tmp):
    (tmp / "part.txt").write_text("weights\n")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "more.json").write_text("[1]")


def make(path, write=write_one, **meta):
    return saved.save_task(path, {"kind": "ner", "labels": ["O"], **meta}, write)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_save_writes_task_json_with_every_files_sha256(tmp_path):
    d = tmp_path / "m"
    make(d, options={"x": 1})
    meta = json.loads((d / "task.json").read_text())
    assert meta["format"] == "torch-elmo-task" and meta["format_version"] == saved.FORMAT_VERSION
    assert meta["torch_elmo_version"] == torch_elmo.__version__ and meta["elmo"] is None
    assert sorted(meta["files"]) == ["part.txt", "sub/more.json"]
    from hashlib import sha256
    assert meta["files"]["part.txt"] == sha256(b"weights\n").hexdigest()
    assert saved.read_task(d)["options"] == {"x": 1}
    assert [p for p in os.listdir(tmp_path) if p != "m"] == []          # no temporaries left
    assert (os.stat(d / "part.txt").st_mode & 0o777) == 0o666 & ~saved.current_umask()


def test_a_failed_save_keeps_the_existing_model_and_leaves_nothing(tmp_path):
    d = tmp_path / "m"
    make(d)
    before = {p: (d / p).read_bytes() for p in ("task.json", "part.txt")}

    def broken(tmp):
        (tmp / "part.txt").write_text("half")
        raise RuntimeError("killed while writing")
    with pytest.raises(RuntimeError):
        make(d, write=broken)
    assert {p: (d / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ["m"]
    make(d, write=lambda tmp: (tmp / "new.txt").write_text("v2"))        # a good save replaces
    assert sorted(os.listdir(d)) == ["new.txt", "task.json"]
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_bad_directories_are_refused_in_one_line(tmp_path, tiny_model):
    with pytest.raises(ElmoError, match="no such directory") as e:
        saved.read_task(tmp_path / "nope")
    one_line(e)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ElmoError, match="file: not a directory"):
        saved.read_task(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ElmoError, match=r"not a saved task model \(no task.json") as e:
        saved.read_task(tmp_path / "empty")
    one_line(e)
    export_model(tiny_model, tmp_path / "lm")
    with pytest.raises(ElmoError, match="an ELMo model .*torch_elmo.load") as e:
        torch_elmo.load_task(tmp_path / "lm")
    one_line(e)

    d = tmp_path / "m"
    make(d)
    meta = json.loads((d / "task.json").read_text())
    (d / "task.json").write_text(json.dumps({**meta, "format_version": saved.FORMAT_VERSION + 1,
                                             "torch_elmo_version": "9.0"}))
    with pytest.raises(ElmoError, match=r"format version 2 by torch-elmo 9\.0.*upgrade") as e:
        saved.read_task(d)
    one_line(e)
    (d / "task.json").write_text(json.dumps(meta))
    (d / "part.txt").write_text("weightz\n")
    with pytest.raises(ElmoError, match=r"part\.txt: sha256 differs .*changed or damaged") as e:
        saved.read_task(d)
    one_line(e)
    (d / "part.txt").unlink()
    with pytest.raises(ElmoError, match=r"part\.txt: missing \(listed in task.json\)") as e:
        saved.read_task(d)
    one_line(e)
    (d / "task.json").write_text("{not json")
    with pytest.raises(ElmoError, match="task.json: not valid JSON") as e:
        saved.read_task(d)
    one_line(e)


def test_a_task_directory_given_to_load_says_load_task(tmp_path):
    d = tmp_path / "m"
    make(d)
    (d / "options.json").write_text("{}")          # even with biLM-looking files beside it
    (d / "weights.hdf5").write_text("")
    for load in (torch_elmo.load, torch_elmo.ElmoEmbedder):
        with pytest.raises(ElmoError, match=r"saved task model.*torch_elmo\.load_task") as e:
            load(str(d))
        one_line(e)


def test_check_save_dir_before_training(tmp_path):
    train = tmp_path / "data" / "train.txt"
    train.parent.mkdir()
    train.write_text("x\n")
    with pytest.raises(ElmoError, match="holds the input"):
        saved.check_save_dir(tmp_path / "data", "--save", [train])
    with pytest.raises(ElmoError, match="is a file"):
        saved.check_save_dir(train, "--save")
    with pytest.raises(ElmoError, match="does not exist"):
        saved.check_save_dir(tmp_path / "no" / "m", "--save")
    with pytest.raises(ElmoError, match="exists and is not a saved task model"):
        saved.check_save_dir(tmp_path / "data", "--save")
    make(tmp_path / "m")
    (tmp_path / "e").mkdir()
    for ok in ("m", "e", "new"):                    # a task model, an empty dir, a new one
        assert saved.check_save_dir(tmp_path / ok, "--save", [train]) == str(tmp_path / ok)


def test_import_torch_elmo_imports_no_task_dependency():
    code = ("import sys, torch_elmo; f = torch_elmo.load_task; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'sklearn', 'skops', 'safetensors', 'seqeval', 'scipy'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
