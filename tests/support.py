"""Shared assertions for tests."""

from tally_client import TallyClient


def assert_consistent(client: TallyClient, account_id: str) -> None:
    """The DESIGN.md invariants 1-4 hold for the account (recomputed by the server)."""
    report = client.verify_account(account_id)
    assert report.consistent, list(report.violations)
    assert report.stored_balance == report.ledger_balance
    assert report.stored_reserved == report.holds_reserved
