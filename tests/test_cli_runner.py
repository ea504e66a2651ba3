"""`delg_tf.cli`: the shared error reporting of the entry modules."""

import pytest

from delg_tf import cli

RUN_ERROR_CODE = 3


def _raise(error):
    raise error


def test_expected_error_is_one_line_and_exit_code(capsys):
    with pytest.raises(SystemExit) as info:
        cli.report_errors(_raise, ValueError("bad --flag\nvalue"))
    assert info.value.code == cli.EXIT_USAGE_ERROR
    assert capsys.readouterr().err == "error: bad --flag value\n"


def test_unexpected_error_keeps_its_traceback():
    with pytest.raises(KeyError):
        cli.report_errors(_raise, KeyError("bug"))


def test_rules_first_match_wins_with_their_code_and_message(capsys):
    rules = [
        cli.ErrorRule((FileNotFoundError,)),
        cli.ErrorRule((OSError,), RUN_ERROR_CODE, lambda e: f"{e}; free space"),
    ]
    with pytest.raises(SystemExit) as info:
        cli.report_errors(_raise, FileNotFoundError("x missing"), expected_errors=rules)
    assert info.value.code == cli.EXIT_USAGE_ERROR
    with pytest.raises(SystemExit) as info:
        cli.report_errors(_raise, OSError("disk full"), expected_errors=lambda: rules)
    assert info.value.code == RUN_ERROR_CODE
    assert capsys.readouterr().err.splitlines()[-1] == "error: disk full; free space"


def test_return_value_passes_through():
    assert cli.report_errors(lambda x: x + 1, 1) == 2
    assert cli.print_error("m", RUN_ERROR_CODE) == RUN_ERROR_CODE
