-- Debit, top-up and adjustment: one entry, no hold. Only a debit is held to the
-- balance rule; credits and adjustments may move available credit anywhere.
CREATE OR REPLACE FUNCTION tally_move(
    p_request_id text, p_fingerprint bytea, p_method text, p_account_id text,
    p_type text, p_amount bigint, p_description text, p_reference text,
    p_metadata jsonb, p_grant jsonb
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    a accounts;
    e ledger_entries;
    r jsonb;
BEGIN
    a := tally_find_account(p_account_id);
    IF a.account_id IS NULL THEN
        RETURN tally_not_found('account', p_account_id);
    END IF;
    r := tally_replay(p_request_id, p_method, p_fingerprint);
    IF r IS NOT NULL THEN
        RETURN r;
    END IF;
    IF p_type = 'debit' AND NOT tally_fits(a, -p_amount) THEN
        RETURN tally_insufficient(a, -p_amount);
    END IF;
    e := tally_post_entry(p_account_id, p_type, p_amount, 0, p_description, p_reference,
                          p_metadata, p_request_id, NULL, p_grant, NULL, true);
    RETURN tally_remember(p_request_id, p_method, p_fingerprint,
                          jsonb_build_object('entry', to_jsonb(e)));
END $$;
