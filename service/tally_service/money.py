"""Exact credit amounts: decimal strings on the wire, integer micro-credits in storage.

No float is involved anywhere: parsing is a strict pattern match on the string.
"""

import re

from tally_service.errors import InvalidArgument, quote

SCALE_DIGITS = 6
MICROS_PER_CREDIT: int = 10**SCALE_DIGITS
# One movement moves at most this much; keeps every sum far from BIGINT overflow.
MAX_MOVEMENT_MICROS = 1_000_000_000 * MICROS_PER_CREDIT

# "+" is never part of an amount; "-" only where a negative amount is allowed (Adjust).
_AMOUNT = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?")


def parse_amount(
    field: str,
    text: str,
    *,
    signed: bool = False,
    allow_zero: bool = False,
    limit_micros: int = MAX_MOVEMENT_MICROS,
) -> int:
    """Parses a decimal string of credits into micro-credits, or raises InvalidArgument."""
    match = _AMOUNT.fullmatch(text)
    if not text:
        raise InvalidArgument(field, "required")
    if match is None:
        raise InvalidArgument(field, f'{quote(text)} is not a decimal number like "2.95"')
    sign, whole, fraction = match.groups()
    if sign and not signed:
        raise InvalidArgument(field, "must not be negative (no sign is allowed)")
    fraction = fraction or ""
    if len(fraction) > SCALE_DIGITS:
        raise InvalidArgument(
            field, f"at most {SCALE_DIGITS} fractional digits are allowed, got {len(fraction)}"
        )
    if len(whole) > 19:
        raise InvalidArgument(field, "too large")
    micros: int = int(whole) * MICROS_PER_CREDIT + int(fraction.ljust(SCALE_DIGITS, "0") or "0")
    if sign == "-":
        micros = -micros
    if micros < 0 and not signed:
        raise InvalidArgument(field, "must not be negative")
    if micros == 0 and not allow_zero:
        raise InvalidArgument(field, "must not be zero")
    if abs(micros) > limit_micros:
        raise InvalidArgument(field, f"at most {format_amount(limit_micros)} credits")
    return micros


def format_amount(micros: int) -> str:
    """Formats micro-credits as the shortest exact decimal string ("2.95", "-10")."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_CREDIT)
    if fraction == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:06d}".rstrip("0")
