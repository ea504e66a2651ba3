"""The toolkit of the command-line entry modules (`delg_tf/{train,export,extract,...}.py`).

Every entry module does the same: define its absl flags, turn them into a validated
config, call its library `main`, and report an *expected* failure (bad flag, missing
file, unwritable folder, ...) as one `error: <message>` line on stderr with a non-zero
exit code and no traceback. Unexpected errors keep their traceback.

    from delg_tf import cli as runner

    def _define_flags():
        return runner.define_config_flags(MyConfig)

    def _config_from_flags(flag_values):
        return MyConfig(**runner.config_kwargs(MyConfig, flag_values))

    def cli():
        runner.run_config_main(_define_flags, _config_from_flags, main)

Flags from a config dataclass (`define_config_flags`): one flag per field, named like
it, with the field's default and type (bool, int, float, str, list for tuples, JSON
text for dicts) and, as help, the field's entry in the class docstring's
`Attributes:` section; `config_kwargs` reads the parsed values back as field values.
So a config's fields, its flags and their help never drift apart.

`expected_errors` is an exception class, a tuple of classes (all exit
`EXIT_USAGE_ERROR`), or a sequence of `ErrorRule`s tried in order (first match wins),
for entry modules with several exit codes or messages; or a zero-argument function
returning one of those, called only when an error happens (for classes of lazily
imported modules such as `tf.errors.OpError`).

Every entry module reports work stopped at a safe point on SIGTERM / SIGINT
(`delg_tf.interrupts.Stopped`: saved, resumable) as one `error:` line too, with the
exit code of the signal (143 / 130), before its own rules.
"""

import dataclasses
import json
import re
import sys
import typing
from typing import Callable, Optional, Tuple

from delg_tf.configs import ConfigError
from delg_tf.interrupts import Stopped

# Exit code of every entry module for bad flags / configs (the one definition).
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
        return (
            ErrorRule(
                expected_errors if isinstance(expected_errors, tuple) else (expected_errors,)
            ),
        )
    return tuple(
        rule
        if isinstance(rule, ErrorRule)
        else ErrorRule(rule if isinstance(rule, tuple) else (rule,))
        for rule in expected_errors
    )


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
    """Returns `function(*args, **kwargs)`; an expected error exits via `fail` (as does
    `Stopped`, with its signal's exit code).
    """
    try:
        return function(*args, **kwargs)
    except BaseException as error:  # noqa: B902 - re-raised unless it is expected.
        if isinstance(error, Stopped):
            fail(one_line(error), error.exit_code)
        rule = matching_rule(error, expected_errors)
        if rule is None:
            raise
        fail(rule.describe(error), rule.exit_code)


def run_main(
    define_flags, main_from_flags, expected_errors=DEFAULT_EXPECTED_ERRORS, flags_parser=None
):
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


# --------------------------------------------------------------------------
# Flags generated from config dataclasses
# --------------------------------------------------------------------------

_ELEMENT_NAMES = {int: "integers", float: "floats", str: "strings"}
# `name:` or `name_a / name_b:` opening an entry of a docstring's `Attributes:` section.
_ATTRIBUTE_LINE = re.compile(r"^(\s+)(\w+(?:\s*/\s*\w+)*):\s*(.*)$")


def attribute_docs(cls) -> dict:
    """{field: text} of the `Attributes:` section of a class docstring.

    An entry is `name: text` (or `name_a / name_b: text`, for both) at the section's
    indentation; more indented lines continue it (joined with spaces); the section
    ends at a less indented line (e.g. `Raises:`).
    """
    docs, current, indent, in_section = {}, [], None, False
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped == "Attributes:":
            in_section = True
            continue
        if not in_section or not stripped:
            continue
        width = len(line) - len(line.lstrip())
        match = _ATTRIBUTE_LINE.match(line)
        if indent is None:
            if not match:
                continue
            indent = width
        if width < indent:
            break
        if match and width == indent:
            current = [name.strip() for name in match.group(2).split("/")]
            for name in current:
                docs[name] = match.group(3).strip()
        else:
            for name in current:
                docs[name] = f"{docs[name]} {stripped}".strip()
    return docs


def _type_hint(cls, field):
    try:
        return typing.get_type_hints(cls).get(field.name, field.type)
    except (NameError, TypeError):
        return field.type


def field_kind(cls, field) -> str:
    """The flag type of a dataclass field, from its type hint (Optional[X] as X).

    One of "bool", "int", "float", "str", "list" (tuples, lists) or "json" (dicts); other
    hints give "str".
    """
    hint = _type_hint(cls, field)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        hint = args[0]
    origin = typing.get_origin(hint) or hint
    for kind, types in (
        ("bool", (bool,)),
        ("int", (int,)),
        ("float", (float,)),
        ("str", (str,)),
        ("list", (tuple, list)),
        ("json", (dict,)),
    ):
        if isinstance(origin, type) and issubclass(origin, types):
            return kind
    default = field.default if field.default is not dataclasses.MISSING else None
    if isinstance(default, bool):
        return "bool"
    return "str"


def list_element_type(cls, field):
    """Element type of a tuple/list field (`Tuple[int, ...]` -> int; default str)."""
    hint = _type_hint(cls, field)
    hint_args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(hint_args) == 1:
        hint = hint_args[0]
    args = [a for a in typing.get_args(hint) if a is not Ellipsis]
    return args[0] if args and isinstance(args[0], type) else str


def field_default(field):
    """A dataclass field's default (its factory's value; None when it has none)."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def format_default(value) -> str:
    """A default as written on the command line (tuples comma-separated)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def define_flag(flag_values, kind, name, default, help_text, choices=None):
    """Defines one absl flag of `kind` (see `field_kind`); an enum if `choices`."""
    from absl import flags

    # Flags defined through this module belong to the entry module calling it (absl's
    # help lists them under it, and `--help` shows them as its key flags).
    flags.disclaim_key_flags()
    if kind == "list" and isinstance(default, (tuple, list)):
        default = [str(v) for v in default]
    if choices:
        flags.DEFINE_enum(name, default, list(choices), help_text, flag_values=flag_values)
    elif kind == "bool":
        flags.DEFINE_boolean(name, default, help_text, flag_values=flag_values)
    elif kind == "int":
        flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
    elif kind == "float":
        flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
    elif kind == "list":
        flags.DEFINE_list(name, default, help_text, flag_values=flag_values)
    else:
        flags.DEFINE_string(name, default, help_text, flag_values=flag_values)


def config_fields(cls, skip=()):
    """The dataclass fields of `cls` that are flags (all but `skip`)."""
    return [f for f in dataclasses.fields(cls) if f.name not in skip]


def define_config_flags(cls, flag_values=None, *, skip=(), choices=None, unset=False):
    """Defines one flag per field of the dataclass `cls` (see the module docstring).

    Args:
      cls: a config dataclass whose docstring has an `Attributes:` section.
      flag_values: absl `FlagValues` to define into (default: the global `FLAGS`).
      skip: field names without a flag (nested configs, derived values).
      choices: {field: allowed values}: those flags are enums.
      unset: every flag defaults to None ("not given": the caller fills in the
        field's default, or another source's value) and its help ends with
        `(default <field default>).`

    Returns:
      `flag_values`.
    """
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    docs, choices = attribute_docs(cls), choices or {}
    for field in config_fields(cls, skip):
        default, help_text = field_default(field), docs.get(field.name, field.name)
        if unset:
            help_text = f"{help_text.rstrip('.')} (default {format_default(default)})."
            default = None
        define_flag(
            flag_values,
            field_kind(cls, field),
            field.name,
            default,
            help_text,
            choices.get(field.name),
        )
    return flag_values


def flag_to_field(cls, field, value):
    """A parsed flag value as the value of `field` of `cls`: a tuple of the field's
    element type for lists, a dict for JSON text; others as parsed.

    Raises:
      ConfigError: an element or the JSON text cannot be converted (names the flag).
    """
    kind = field_kind(cls, field)
    if value is None:
        return None
    if kind == "list":
        element = list_element_type(cls, field)
        try:
            return tuple(element(v) for v in value)
        except ValueError as e:
            plural = _ELEMENT_NAMES.get(element, element.__name__)
            raise ConfigError(
                f"--{field.name} must be a comma-separated list of {plural}; received {value!r}.",
                field.name,
            ) from e
    if kind == "json":
        try:
            return json.loads(value)
        except ValueError as e:
            raise ConfigError(
                f"--{field.name} must be a JSON object such as "
                f"'{{\"base_width\": 16}}'; received {value!r}.",
                field.name,
            ) from e
    return value


def config_kwargs(cls, flag_values, *, skip=(), unset=False) -> dict:
    """{field: value} of the flags of `cls` (see `define_config_flags`).

    Args:
      cls: the config dataclass.
      flag_values: parsed absl `FlagValues`.
      skip: fields without a flag.
      unset: leave out fields whose flag is None (not given), so that the config (or
        the caller) keeps its default.
    """
    kwargs = {}
    for field in config_fields(cls, skip):
        value = flag_to_field(cls, field, getattr(flag_values, field.name))
        if value is None and unset:
            continue
        kwargs[field.name] = value
    return kwargs
