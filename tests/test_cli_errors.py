"""The CLI's one error path: expected failures name what is wrong (exit 2), an unexpected one says
it is a bug (exit 1), `--debug` / VITUNE_DEBUG=1 show the traceback, OS errors read as sentences."""

import pytest

from vitune import cli


def fail_with(exc):
    def fn(args):
        raise exc
    return fn


@pytest.mark.parametrize("exc, code, message", [
    (RuntimeError("boom"), 1, r"vitune train: internal error: RuntimeError: boom\nThis is a bug in vitune"),
    (IsADirectoryError(21, "Is a directory", "/x/data"), 2, r"vitune train: error: /x/data: is a directory"),
    (PermissionError(13, "Permission denied", "/x/out"), 2, r"error: /x/out: permission denied"),
    (KeyboardInterrupt(), 130, r"vitune train: interrupted"),
])
def test_errors_leave_through_one_path(monkeypatch, capsys, exc, code, message):
    monkeypatch.setattr(cli, "cmd_train", fail_with(exc))
    assert cli.main(["train", "--preset", "tiny", "--out", "x"]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert __import__("re").search(message, err), err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(monkeypatch, capsys, how):
    monkeypatch.setattr(cli, "cmd_train", fail_with(RuntimeError("boom")))
    argv = ["train", "--preset", "tiny", "--out", "x"]
    if how == "flag":
        argv = ["--debug", *argv]
    else:
        monkeypatch.setenv("VITUNE_DEBUG", "1")
    assert cli.main(argv) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
