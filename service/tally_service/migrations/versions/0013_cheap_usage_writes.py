"""Usage at batch speed: the references of usage_events are checked once per statement
instead of once per row, and the caller stamp runs only where it changes something.

A usage event cost 100 to 220 µs of PostgreSQL (docs/benchmarks.md, "Where a usage
event's PostgreSQL time goes"); about a third of it was per-row trigger work:

- Three foreign keys of usage_events (account_id, product_id, entry_id), each a per-row
  trigger running its own query, become one statement-level trigger over the
  statement's transition table: the same check (every referenced row exists, SQLSTATE
  23503 otherwise) as one set query, and the same lock (FOR KEY SHARE on each
  referenced account and product, once per distinct key instead of once per row). An
  UPDATE that changes a reference is checked by a row trigger whose WHEN is false
  otherwise. The referenced side keeps its guarantee with row triggers on accounts and
  products that refuse a DELETE, or a change of the key, of a row still referenced (and
  a TRUNCATE of products while usage_events has rows); ledger entries cannot be deleted
  at all (migration 0001). The foreign keys on reservation_id stay (NULL on the hot
  path), and so does ledger_entries' foreign key on account_id: most statements that
  write entries write one, and for one row a statement trigger's query (about 35 to
  55 µs) costs more than the foreign key's (about 20 µs).
- `ledger_entries_caller` (a PL/pgSQL call per entry) gets a WHEN clause: it fires only
  when a caller is set and the entry's metadata does not already carry it. Writers that
  stamp the caller themselves (`tally_record_usage`) skip it; for every other entry it
  does what it did, so every path is still stamped.

Revision ID: 0013
Revises: 0012
"""

from tally_service.migrations.script import run_script

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

SCHEMA = r"""
-- The caller stamp: only where it changes the metadata (the function is unchanged).
DROP TRIGGER ledger_entries_caller ON ledger_entries;
CREATE TRIGGER ledger_entries_caller BEFORE INSERT ON ledger_entries
    FOR EACH ROW
    WHEN (coalesce(current_setting('tally.caller', true), '') <> ''
          AND NEW.metadata -> 'caller'
              IS DISTINCT FROM to_jsonb(current_setting('tally.caller', true)))
    EXECUTE FUNCTION tally_stamp_caller();

-- New usage events: their accounts and products exist (locked FOR KEY SHARE, once
-- each), and so does the ledger entry of each charged one. Ledger entries are never
-- deleted (ledger_entries_append_only), so they need no lock.
CREATE FUNCTION tally_events_references() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_column text;
    v_missing text;
BEGIN
    IF TG_LEVEL = 'ROW' THEN
        -- an update that changed a reference (the WHEN of the trigger): that row
        IF NOT EXISTS (SELECT 1 FROM accounts WHERE account_id = NEW.account_id
                       FOR KEY SHARE) THEN
            v_column := 'account_id';
            v_missing := NEW.account_id;
        ELSIF NOT EXISTS (SELECT 1 FROM products WHERE product_id = NEW.product_id
                          FOR KEY SHARE) THEN
            v_column := 'product_id';
            v_missing := NEW.product_id;
        ELSIF NEW.entry_id IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM ledger_entries WHERE entry_id = NEW.entry_id) THEN
            v_column := 'entry_id';
            v_missing := NEW.entry_id::text;
        END IF;
    ELSE
        SELECT 'account_id', d.account_id INTO v_column, v_missing
        FROM (SELECT DISTINCT account_id FROM new_events) d
        LEFT JOIN LATERAL (SELECT 1 AS found FROM accounts a
                           WHERE a.account_id = d.account_id FOR KEY SHARE) a ON true
        WHERE a.found IS NULL
        LIMIT 1;
        IF NOT FOUND THEN
            SELECT 'product_id', d.product_id INTO v_column, v_missing
            FROM (SELECT DISTINCT product_id FROM new_events) d
            LEFT JOIN LATERAL (SELECT 1 AS found FROM products p
                               WHERE p.product_id = d.product_id FOR KEY SHARE) p ON true
            WHERE p.found IS NULL
            LIMIT 1;
        END IF;
        IF NOT FOUND THEN
            -- one probe of the primary key per event (a scalar subquery: never a scan
            -- of the whole ledger, whatever the planner guesses)
            SELECT 'entry_id', n.entry_id::text INTO v_column, v_missing
            FROM new_events n
            WHERE n.entry_id IS NOT NULL
              AND (SELECT l.entry_id FROM ledger_entries l WHERE l.entry_id = n.entry_id)
                  IS NULL
            LIMIT 1;
        END IF;
    END IF;
    IF v_column IS NOT NULL THEN
        RAISE EXCEPTION 'insert or update on table "usage_events" violates its reference %',
                        v_column
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = format('Key (%s)=(%s) is not present.', v_column, v_missing);
    END IF;
    RETURN NULL;
END $$;
ALTER TABLE usage_events DROP CONSTRAINT usage_events_account_id_fkey;
ALTER TABLE usage_events DROP CONSTRAINT usage_events_product_id_fkey;
ALTER TABLE usage_events DROP CONSTRAINT usage_events_entry_id_fkey;
CREATE TRIGGER usage_events_references AFTER INSERT ON usage_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION tally_events_references();
-- An update checks what it changed, as the foreign keys did (tally_finish_usage sets
-- entry_id; nothing changes the account or the product).
CREATE TRIGGER usage_events_references_changed
    AFTER UPDATE OF account_id, product_id, entry_id ON usage_events
    FOR EACH ROW
    WHEN (NEW.account_id IS DISTINCT FROM OLD.account_id
          OR NEW.product_id IS DISTINCT FROM OLD.product_id
          OR NEW.entry_id IS DISTINCT FROM OLD.entry_id)
    EXECUTE FUNCTION tally_events_references();

-- The referenced side: an account or a product still referenced by an event is
-- neither deleted nor renamed (what ON DELETE/UPDATE NO ACTION did, also after the
-- row changed). AFTER triggers with a column list: an UPDATE of other columns (every
-- movement updates its account) queues nothing, where a BEFORE row trigger would make
-- every UPDATE of accounts fetch and lock its row once more.
CREATE FUNCTION tally_account_referenced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.account_id = OLD.account_id THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM usage_events WHERE account_id = OLD.account_id) THEN
        RAISE EXCEPTION 'account % is still referenced', OLD.account_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER accounts_referenced AFTER DELETE OR UPDATE OF account_id ON accounts
    FOR EACH ROW EXECUTE FUNCTION tally_account_referenced();

CREATE FUNCTION tally_product_referenced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        IF EXISTS (SELECT 1 FROM usage_events) THEN
            RAISE EXCEPTION 'products are still referenced by usage_events'
                USING ERRCODE = 'foreign_key_violation';
        END IF;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.product_id = OLD.product_id THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM usage_events WHERE product_id = OLD.product_id) THEN
        RAISE EXCEPTION 'product % is still referenced', OLD.product_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER products_referenced AFTER DELETE OR UPDATE OF product_id ON products
    FOR EACH ROW EXECUTE FUNCTION tally_product_referenced();
CREATE TRIGGER products_referenced_truncate BEFORE TRUNCATE ON products
    FOR EACH STATEMENT EXECUTE FUNCTION tally_product_referenced();
"""

DROP = r"""
DROP TRIGGER products_referenced_truncate ON products;
DROP TRIGGER products_referenced ON products;
DROP FUNCTION tally_product_referenced();
DROP TRIGGER accounts_referenced ON accounts;
DROP FUNCTION tally_account_referenced();
DROP TRIGGER usage_events_references_changed ON usage_events;
DROP TRIGGER usage_events_references ON usage_events;
DROP FUNCTION tally_events_references();
ALTER TABLE usage_events ADD CONSTRAINT usage_events_account_id_fkey
    FOREIGN KEY (account_id) REFERENCES accounts (account_id);
ALTER TABLE usage_events ADD CONSTRAINT usage_events_product_id_fkey
    FOREIGN KEY (product_id) REFERENCES products (product_id);
ALTER TABLE usage_events ADD CONSTRAINT usage_events_entry_id_fkey
    FOREIGN KEY (entry_id) REFERENCES ledger_entries (entry_id);
DROP TRIGGER ledger_entries_caller ON ledger_entries;
CREATE TRIGGER ledger_entries_caller BEFORE INSERT ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION tally_stamp_caller();
"""


def upgrade() -> None:
    run_script(SCHEMA)


def downgrade() -> None:
    run_script(DROP)
