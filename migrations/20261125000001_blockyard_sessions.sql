-- The session routing table, exactly as blockyard creates it, so both can share one database.
-- Runs with search_path set to the configured schema (default `blockyard`). Idempotent against a
-- database where blockyard already created the table: nothing is dropped or rewritten.

CREATE TABLE IF NOT EXISTS blockyard_sessions (
    id          TEXT PRIMARY KEY,
    worker_id   TEXT NOT NULL,
    user_sub    TEXT NOT NULL DEFAULT '',
    last_access TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);

-- One index per lookup column, unless an index leading with that column exists already (blockyard
-- may have created it under another name).
DO $$
DECLARE
    col TEXT;
BEGIN
    FOREACH col IN ARRAY ARRAY['expires_at', 'worker_id', 'last_access'] LOOP
        IF NOT EXISTS (
            SELECT 1
            FROM pg_index i
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = 'blockyard_sessions'::regclass AND a.attname = col
        ) THEN
            EXECUTE format('CREATE INDEX %I ON blockyard_sessions (%I)',
                           'idx_blockyard_sessions_' || col, col);
        END IF;
    END LOOP;
END
$$;
