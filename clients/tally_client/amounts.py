"""Conversion between Python numbers and Tally's decimal-string amounts.

On the wire an amount is a decimal string of credits with at most 6 fractional
digits ("2.95", "10", "-1.5", "0.000001"); the server never rounds.
"""

from __future__ import annotations

import decimal
from decimal import Decimal

__all__ = ["MAX_FRACTION_DIGITS", "Amount", "from_wire", "to_wire"]

#: Fractional digits an amount may have on the wire.
MAX_FRACTION_DIGITS = 6

#: What the client accepts wherever an amount is expected.
Amount = str | Decimal | int


def to_wire(x: Amount) -> str:
    """Format an amount for the wire.

    * ``str`` is sent verbatim: the server is the authority on its syntax and
      answers a malformed amount with INVALID_ARGUMENT and a field violation.
    * ``int`` is formatted in base 10.
    * ``Decimal`` is formatted in plain notation (``Decimal("1E+2")`` -> ``"100"``)
      with trailing fractional zeros dropped; it is never rounded, so a value
      with more than 6 significant fractional digits raises ``ValueError``, as
      does NaN or an infinity.
    * ``float`` (and ``bool``) raise ``TypeError``: binary floats cannot hold
      most decimal amounts exactly. Use ``Decimal`` or ``str``.
    """
    if isinstance(x, bool | float):
        raise TypeError(
            f"amount must be str, Decimal or int, not {type(x).__name__} "
            "(floats cannot represent decimal amounts exactly)"
        )
    if isinstance(x, str):
        return x
    if isinstance(x, int):
        return str(x)
    if isinstance(x, Decimal):
        return _format_decimal(x)
    raise TypeError(f"amount must be str, Decimal or int, not {type(x).__name__}")


def _format_decimal(x: Decimal) -> str:
    if not x.is_finite():
        raise ValueError(f"amount must be finite, got {x}")
    if x.is_zero():
        return "0"
    with decimal.localcontext() as ctx:
        # normalize() rounds to the context precision; make it exact.
        ctx.prec = max(ctx.prec, len(x.as_tuple().digits))
        n = x.normalize()
    exponent = n.as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    if exponent < -MAX_FRACTION_DIGITS:
        raise ValueError(
            f"amount {x} has more than {MAX_FRACTION_DIGITS} fractional digits "
            "(amounts are never rounded)"
        )
    return format(n, "f")


def from_wire(s: str) -> Decimal:
    """Parse a wire amount (e.g. ``"-2.950000"``) into a ``Decimal``.

    Raises ``ValueError`` for a string that is not a finite decimal number.
    """
    try:
        d = Decimal(s)
    except decimal.InvalidOperation:
        raise ValueError(f"not a decimal amount: {s!r}") from None
    if not d.is_finite():
        raise ValueError(f"not a decimal amount: {s!r}")
    return d
