"""Amount parsing and formatting: exact, strict, never rounded."""

import pytest

from tally_service.errors import InvalidArgument
from tally_service.money import format_amount, parse_amount


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("2.95", 2_950_000),
        ("10", 10_000_000),
        ("0.000001", 1),
        ("1000000000", 10**15),
        ("007.5", 7_500_000),
        ("1.", None),
    ],
)
def test_parse(text: str, micros: int | None) -> None:
    if micros is None:
        with pytest.raises(InvalidArgument):
            parse_amount("amount", text)
    else:
        assert parse_amount("amount", text) == micros


@pytest.mark.parametrize(
    "text",
    [
        "",
        " 1",
        "1 ",
        "1e3",
        "0x10",
        "1,5",
        "1.0000001",
        "-1",
        "+1",
        "0",
        "0.000000",
        "NaN",
        "inf",
        ".5",
        "1..2",
        "1000000000.000001",
        "\u0661",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_amount("amount", text)
    assert info.value.field == "amount"


def test_signed_and_zero() -> None:
    assert parse_amount("amount", "-1.5", signed=True) == -1_500_000
    assert parse_amount("amount", "0", allow_zero=True) == 0
    assert parse_amount("amount", "2", signed=True) == 2_000_000


@pytest.mark.parametrize("text", ["+2", "+0", "-0", "+-1", "-+1", "--1", "+", "-", "\u22121"])
def test_plus_never_and_minus_only_where_signed(text: str) -> None:
    """DESIGN.md, Amounts: a leading "-" only where a negative amount is allowed; "+" never."""
    for signed in (False, True):
        if signed and text == "-0":
            continue  # "-0" is zero: refused below as a movement of nothing
        with pytest.raises(InvalidArgument) as info:
            parse_amount("amount", text, signed=signed, allow_zero=True)
        assert info.value.field == "amount"
    with pytest.raises(InvalidArgument, match="zero"):
        parse_amount("amount", "-0", signed=True)


def test_a_huge_value_is_quoted_briefly() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_amount("amount", "x" * 100_000)
    assert len(info.value.message) < 200
    assert "…" in info.value.message


@pytest.mark.parametrize(
    ("micros", "text"),
    [(2_950_000, "2.95"), (-10_000_000, "-10"), (1, "0.000001"), (0, "0"), (-1, "-0.000001")],
)
def test_format(micros: int, text: str) -> None:
    assert format_amount(micros) == text
    assert parse_amount("a", text, signed=True, allow_zero=True) == micros
