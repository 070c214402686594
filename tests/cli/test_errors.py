"""The CLI's top level: every error a user can act on is one `error:` line on stderr and exit status 2."""

import errno

import pytest

from megatron_peft_export import cli
from megatron_peft_export.errors import ExportError, OutputError
from megatron_peft_export.services.hub import PushError


@pytest.mark.parametrize(
    "raised,line",
    [
        (ExportError("expected x,\nfound y;\n  do z"), "error: expected x, found y; do z"),
        (OutputError("out already exists"), "error: out already exists"),
        (PushError("401\r\n"), "error: 401"),
        (ExportError(), "error: ExportError"),
        (
            PermissionError(errno.EACCES, "Permission denied", "/ckpt/iter_0000001/common.pt"),
            "error: Permission denied (/ckpt/iter_0000001/common.pt); nothing was written",
        ),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else "",
)
def test_user_errors_are_one_line_and_exit_2(monkeypatch, capsys, raised, line):
    def run(args):
        raise raised

    monkeypatch.setattr(cli.formats, "run", run)
    assert cli.main(["formats"]) == 2
    assert capsys.readouterr().err == line + "\n"


def test_an_interrupt_exits_130_without_a_traceback(monkeypatch, capsys):
    def run(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.formats, "run", run)
    assert cli.main(["formats"]) == 130
    assert capsys.readouterr().err == "interrupted; nothing was published\n"


def test_a_token_in_a_message_is_masked(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecret")

    def run(args):
        raise ExportError("header Authorization: Bearer hf_secretsecretsecret refused")

    monkeypatch.setattr(cli.formats, "run", run)
    assert cli.main(["formats"]) == 2
    err = capsys.readouterr().err
    assert "hf_secretsecretsecret" not in err and err.count("\n") == 1


def test_every_error_type_has_its_line_and_exit_status_in_the_one_table():
    import inspect

    from megatron_peft_export import errors

    types = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, ExportError)]
    assert len(types) >= 13 and set(types) <= set(cli.EXIT_STATUS)
    for error_type in types:
        assert cli.failure(error_type("expected a,\n found b")) == ("error: expected a, found b", 2)
    assert cli.failure(KeyboardInterrupt()) == ("interrupted; nothing was published", 130)
