-- Redis cache entries the operator could not update (src/store/layered.rs, "durable repair"):
-- kept in Postgres, the source of truth, so that a restart or a failover does not forget them.
-- `kind` is 'id' (one session), 'worker' (every cached session of a worker) or 'all' (the whole
-- cache); `seq` changes on every new mark, so a repair clears only the marks it repaired.

CREATE SEQUENCE IF NOT EXISTS session_operator_cache_repair_seq;

CREATE TABLE IF NOT EXISTS session_operator_cache_repairs (
    kind      TEXT NOT NULL,
    key       TEXT NOT NULL,
    seq       BIGINT NOT NULL DEFAULT nextval('session_operator_cache_repair_seq'),
    marked_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, key)
);
