"""Shared assertions for tests."""

import os

from tally_client import TallyClient

# How many times more examples a Hypothesis test draws under the "long" profile.
LONG_FACTOR = 25


def scaled(examples: int) -> int:
    """A test's example count: as given in CI, LONG_FACTOR times more in a long run."""
    if os.environ.get("TALLY_HYPOTHESIS_PROFILE") == "long":
        return examples * LONG_FACTOR
    return examples


def assert_consistent(client: TallyClient, account_id: str) -> None:
    """The DESIGN.md invariants 1-4 hold for the account (recomputed by the server)."""
    report = client.verify_account(account_id)
    assert report.consistent, list(report.violations)
    assert report.stored_balance == report.ledger_balance
    assert report.stored_reserved == report.holds_reserved
