"""torch_elmo.cli: every command's parser and help, the error and warning format, the torchrun
argument reconstruction."""
import warnings

import pytest

from torch_elmo import cli
from torch_elmo.cli.common import argv_from_args, warnings_as_lines


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: elmo {command}" in capsys.readouterr().out


def test_unknown_command_and_no_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main([])


def test_warnings_are_one_line_with_the_command(capsys):
    with warnings_as_lines("vocab"):
        warnings.warn("something odd\nsecond line stays in the message")
    err = capsys.readouterr().err
    assert err.startswith("elmo vocab: warning: something odd")


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    rc = cli.main(["test", "--test", str(tmp_path / "none*.txt"), "--vocab", "v", "--save-dir",
                   str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("elmo test: error: ")


def test_nproc_shortcut_passes_the_other_flags():
    from torch_elmo.cli.lm import add_train_flags
    import argparse
    p = argparse.ArgumentParser()
    add_train_flags(p)
    argv = ["--train", "a b.txt", "--vocab", "v", "--save-dir", "s", "--nproc", "2", "--resume",
            "--epochs", "1.5", "--dist-timeout", "9", "--progress"]
    args = p.parse_args(argv)
    out = argv_from_args(args, add_train_flags)
    assert "--nproc" not in out
    assert p.parse_args(out + ["--nproc", "2"]) == args
    assert "--progress" in out and "--no-progress" not in out
    args = p.parse_args(argv[:6] + ["--no-progress"])
    assert argv_from_args(args, add_train_flags)[-1:] == ["--no-progress"]


def test_vocab_unk_word_flag_and_the_note_without_it(tmp_path, capsys):
    from torch_elmo.vocab import Vocabulary
    corpus = tmp_path / "wiki.txt"
    corpus.write_text("the <unk> sat on the mat\nthe <unk> ran\n")
    assert cli.main(["vocab", "--train", str(corpus), "--out", str(tmp_path / "a.txt")]) == 0
    err = capsys.readouterr().err
    assert "'<unk>' 2 times" in err and "--unk-word '<unk>'" in err and len(err.splitlines()) == 1
    assert "<unk>" in Vocabulary.read(tmp_path / "a.txt")
    assert cli.main(["vocab", "--train", str(corpus), "--out", str(tmp_path / "b.txt"),
                     "--unk-word", "<unk>"]) == 0
    out, err = capsys.readouterr()
    assert "2 occurrence(s) are <UNK> targets" in out and "note:" not in err
    v = Vocabulary.read(tmp_path / "b.txt")
    assert "<unk>" not in v and v.word_to_id("<unk>") == v.unk


@pytest.mark.parametrize("command", ["train", "embed", "classify", "ner", "quickstart"])
def test_long_commands_take_progress_and_no_progress(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert "--progress" in out and "--no-progress" in out


@pytest.mark.parametrize("command,ours,theirs", [
    ("train", ["--train", "--vocab", "--save-dir", "--batch-size", "--epochs", "--nproc"],
     ["--train_prefix", "--vocab_file", "--save_dir", "--batch_size", "--n_epochs", "--n_gpus"]),
    ("test", ["--test", "--vocab", "--save-dir", "--batch-size"],
     ["--test_prefix", "--vocab_file", "--save_dir", "--batch_size"]),
    ("export", ["--save-dir", "--out"], ["--save_dir", "--outfile"])])
def test_help_shows_our_spelling_not_bilm_tfs(command, ours, theirs, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert all(f in out for f in ours) and not any(f in out for f in theirs)
    import argparse
    p = argparse.ArgumentParser()           # and the aliases parse to our flags
    cli.COMMANDS[command][1](p)
    args = p.parse_args({
        "train": ["--train_prefix=a*", "--vocab_file", "v", "--save_dir", "s", "--n_gpus", "2"],
        "test": ["--test_prefix=a*", "--vocab_file", "v", "--save_dir", "s", "--batch_size", "8"],
        "export": ["--save_dir", "s", "--outfile", "w.hdf5"]}[command])
    assert args.save_dir == "s"
    if command != "export":
        assert (args.vocab, getattr(args, command)) == ("v", "a*")
