"""One runner for the command-line entry modules (`delg_tf/{export,extract,...}.py`).

Every entry module does the same: define its absl flags, turn them into a validated
config, call its library `main`, and report an *expected* failure (bad flag, missing
file, unwritable folder, ...) as one `error: <message>` line on stderr with a non-zero
exit code and no traceback. Unexpected errors keep their traceback.

    from delg_tf import cli as runner

    def cli():
        runner.run_config_main(_define_flags, _config_from_flags, main)

`expected_errors` is an exception class, a tuple of classes (all exit
`EXIT_USAGE_ERROR`), or a sequence of `ErrorRule`s tried in order (first match wins),
for entry modules with several exit codes or messages; or a zero-argument function
returning one of those, called only when an error happens (for classes of lazily
imported modules such as `tf.errors.OpError`).
"""

import dataclasses
import sys
from typing import Callable, Optional, Tuple

EXIT_USAGE_ERROR = 2
# Bad flag values / configs, missing inputs, outputs that exist without --overwrite.
DEFAULT_EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def one_line(error) -> str:
    """`str(error)` with every run of whitespace (newlines too) collapsed to one space."""
    return " ".join(str(error).split())


@dataclasses.dataclass(frozen=True)
class ErrorRule:
    """How one kind of expected error is reported.

    Attributes:
      errors: exception classes this rule handles.
      exit_code: process exit code.
      describe: error -> message (default: `one_line`).
    """

    errors: Tuple[type, ...]
    exit_code: int = EXIT_USAGE_ERROR
    describe: Callable[[BaseException], str] = one_line


def _is_class_or_classes(value) -> bool:
    if isinstance(value, type):
        return True
    return isinstance(value, tuple) and all(isinstance(v, type) for v in value)


def as_rules(expected_errors) -> Tuple[ErrorRule, ...]:
    """`expected_errors` (see the module docstring) as a tuple of rules."""
    if callable(expected_errors) and not isinstance(expected_errors, type):
        expected_errors = expected_errors()
    if _is_class_or_classes(expected_errors):
        return (ErrorRule(expected_errors if isinstance(expected_errors, tuple)
                          else (expected_errors,)),)
    return tuple(rule if isinstance(rule, ErrorRule)
                 else ErrorRule(rule if isinstance(rule, tuple) else (rule,))
                 for rule in expected_errors)


def print_error(message, exit_code: int = EXIT_USAGE_ERROR) -> int:
    """Prints `error: <message on one line>` on stderr; returns `exit_code`."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    return exit_code


def fail(message, exit_code: int = EXIT_USAGE_ERROR):
    """`print_error` then exit with `exit_code`."""
    sys.exit(print_error(message, exit_code))


def matching_rule(error: BaseException, expected_errors) -> Optional[ErrorRule]:
    """The first rule handling `error`, or None (an unexpected error)."""
    for rule in as_rules(expected_errors):
        if isinstance(error, rule.errors):
            return rule
    return None


def report_errors(function, *args, expected_errors=DEFAULT_EXPECTED_ERRORS, **kwargs):
    """Returns `function(*args, **kwargs)`; an expected error exits via `fail`."""
    try:
        return function(*args, **kwargs)
    except BaseException as error:  # noqa: B902 - re-raised unless it is expected.
        rule = matching_rule(error, expected_errors)
        if rule is None:
            raise
        fail(rule.describe(error), rule.exit_code)


def run_main(define_flags, main_from_flags, expected_errors=DEFAULT_EXPECTED_ERRORS,
             flags_parser=None):
    """Console entry point body: absl `app.run` of `main_from_flags(FLAGS)`.

    Args:
      define_flags: zero-argument function defining the module's flags (or None).
      main_from_flags: function of the parsed `absl.flags.FLAGS`; builds the config and
        calls the library `main`.
      expected_errors: see the module docstring.
      flags_parser: optional absl `flags_parser` (argv -> remaining args).
    """
    from absl import app, flags

    if define_flags is not None:
        define_flags()

    def _run(argv):
        del argv
        report_errors(main_from_flags, flags.FLAGS, expected_errors=expected_errors)

    if flags_parser is None:
        app.run(_run)
    else:
        app.run(_run, flags_parser=flags_parser)


def run_config_main(define_flags, config_from_flags, main, expected_errors=DEFAULT_EXPECTED_ERRORS):
    """`run_main` of `main(config_from_flags(FLAGS))`: the usual entry-module shape."""

    def main_from_flags(flag_values):
        return main(config_from_flags(flag_values))

    run_main(define_flags, main_from_flags, expected_errors=expected_errors)
