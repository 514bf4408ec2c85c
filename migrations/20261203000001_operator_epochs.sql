-- Fencing epochs of the operator (see src/store/fencing.rs): one row per leadership scope (the
-- Lease, `namespace/name`). A new leader increments `epoch` when it acquires the Lease; every
-- mutation of the operator checks, in its own transaction, that the epoch it holds is still this
-- row's. blockyard never reads or writes this table.

CREATE TABLE IF NOT EXISTS session_operator_epochs (
    scope      TEXT PRIMARY KEY,
    epoch      BIGINT NOT NULL,
    holder     TEXT NOT NULL,
    claimed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
