-- The stored response of an earlier request with this key, or NULL. The same key with
-- another method or payload is refused (AIP-155): callers return what this returns.
CREATE OR REPLACE FUNCTION tally_replay(p_request_id text, p_method text, p_fingerprint bytea)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    k idempotency_keys;
BEGIN
    SELECT * INTO k FROM idempotency_keys WHERE request_id = p_request_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF k.method <> p_method OR k.fingerprint <> p_fingerprint THEN
        RETURN tally_refusal('TA409', json_build_object(
            'request_id', p_request_id,
            'original_method', k.method,
            'mismatch', CASE WHEN k.method <> p_method THEN 'method' ELSE 'payload' END));
    END IF;
    RETURN jsonb_build_object('replayed', true, 'response', k.response);
END $$;

-- Stores the response under the key, in the transaction of the change itself.
CREATE OR REPLACE FUNCTION tally_remember(
    p_request_id text, p_method text, p_fingerprint bytea, p_response jsonb
) RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO idempotency_keys (request_id, method, fingerprint, response)
    VALUES (p_request_id, p_method, p_fingerprint, p_response);
    RETURN jsonb_build_object('replayed', false, 'response', p_response);
END $$;
