"""GetBalance in one round trip: catch up under the lock only when something fell due,
then read the account and its grant totals in one statement (one snapshot).

Revision ID: 0005
Revises: 0004
"""

from tally_service.migrations.script import run_script

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

SCHEMA = r"""
CREATE FUNCTION tally_balance(p_account_id text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
    v_renews_at timestamptz;
    r jsonb;
BEGIN
    SELECT subscription_renews_at INTO v_renews_at FROM accounts
    WHERE account_id = p_account_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'account not found' USING ERRCODE = 'TA404',
            DETAIL = json_build_object('resource', 'account', 'id', p_account_id)::text;
    END IF;
    IF v_renews_at <= v_now
       OR EXISTS (SELECT 1 FROM holds WHERE account_id = p_account_id
                  AND status = 'pending' AND expires_at <= v_now)
       OR EXISTS (SELECT 1 FROM grants WHERE account_id = p_account_id
                  AND remaining > 0 AND expires_at <= v_now) THEN
        PERFORM tally_lock_account(p_account_id);
    END IF;
    SELECT jsonb_build_object(
        'account', to_jsonb(a),
        'subscription_credits', coalesce(sum(g.remaining) FILTER (
            WHERE g.grant_type = 'subscription'), 0),
        'purchased_credits', coalesce(sum(g.remaining) FILTER (
            WHERE g.grant_type <> 'subscription'), 0))
    INTO r
    FROM accounts a
    LEFT JOIN grants g ON g.account_id = a.account_id AND g.remaining > 0
    WHERE a.account_id = p_account_id
    GROUP BY a.*;
    RETURN jsonb_build_object('replayed', false, 'response', r);
END $$;
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    run_script("DROP FUNCTION tally_balance(text);")
