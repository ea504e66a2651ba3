"""What every config of the package shares: one error and one way to check a field.

Every config dataclass (training, models, extraction, export, matching, evaluation,
conversion, the demo) validates itself once, in ``__post_init__``, with these helpers
and raises :class:`ConfigError`. A message names the field as the user sets it -- the
flag ``--name`` (default) or ``Owner.name`` for a library config without a flag of
that name -- then what was expected, what was received and, optionally, the fix::

    --momentum must be a float in [0, 1); received 1.5.
    MatchingConfig.min_inliers must be an integer >= 0; received -1; pass such a value
    or keep the default 0.

The entry modules report a ConfigError (a ValueError) as one ``error:`` line with exit
code ``delg_tf.cli.EXIT_USAGE_ERROR``.

Imports nothing from delg_tf (nor TensorFlow), so that every room can use it.
"""

import math
import numbers

# The model families of `python -m delg_tf.train --model_family` (training, export and
# evaluation accept these).
MODEL_FAMILIES = ("delg", "glocal")


class ConfigError(ValueError):
    """An invalid config value or flag; the message names the field, what was expected,
    what was received and the fix.

    Attributes:
        field: the offending field (the flag of the same name), or None when the
            message is about several fields.
        expected: what the field must be, e.g. ``"an integer >= 1"`` (or None).
        received: the value given (or None).
    """

    def __init__(self, message, field=None, expected=None, received=None):
        super().__init__(message)
        self.field, self.expected, self.received = field, expected, received


def field_name(field, owner=None) -> str:
    """How a message names `field`: ``--field``, or ``Owner.field`` when `owner` is given."""
    return f"{owner}.{field}" if owner else f"--{field}"


def expect(ok, field, expected, received, *, owner=None, fix=None):
    """Raises ConfigError ``<name> must be <expected>; received <received!r>[; <fix>].``
    unless `ok` (see `field_name` for `owner`).
    """
    if ok:
        return
    message = f"{field_name(field, owner)} must be {expected}; received {received!r}"
    raise ConfigError(message + (f"; {fix}." if fix else "."), field, expected, received)


def expect_choice(field, value, choices, *, owner=None, fix=None):
    """`expect` that `value` is one of `choices` (listed as ``one of a, b, c``)."""
    expect(
        value in choices,
        field,
        f"one of {', '.join(str(c) for c in choices)}",
        value,
        owner=owner,
        fix=fix,
    )


def expect_int(field, value, minimum=None, *, owner=None, fix=None, expected=None):
    """`expect` that `value` is an integer (not a bool), >= `minimum` if given.

    `expected` replaces the default wording (``an integer >= <minimum>``).
    """
    ok = is_int(value) and (minimum is None or value >= minimum)
    if expected is None:
        expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    expect(ok, field, expected, value, owner=owner, fix=fix)


def require(value, field, description, *, owner=None):
    """Raises ConfigError ``<name> is required (<description>).`` if `value` is empty."""
    if not value:
        raise ConfigError(
            f"{field_name(field, owner)} is required ({description}).", field, description, value
        )


def is_int(value) -> bool:
    """True for integers (numpy ones too), False for bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite(value) -> bool:
    """True for finite real numbers (not bools)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
