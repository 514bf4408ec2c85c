-- The operator's durable memory of each policy's workers (see src/store/worker_records.rs): a
-- new leader, or an operator started after a worker vanished, completes the departures the
-- previous one saw or could not see. Written only by the operator; blockyard never reads it.

CREATE TABLE IF NOT EXISTS session_operator_workers (
    policy      TEXT NOT NULL,         -- namespace/name of the SessionPolicy
    worker_id   TEXT NOT NULL,
    pod         TEXT NOT NULL DEFAULT '',
    family      TEXT,                  -- Deployment/<name>, StatefulSet/<name>, Generated/<prefix>
    created_at  TIMESTAMPTZ,           -- the pod's creationTimestamp
    first_seen  TIMESTAMPTZ NOT NULL,
    last_seen   TIMESTAMPTZ NOT NULL,
    departed_at TIMESTAMPTZ,           -- NULL while the worker serves
    PRIMARY KEY (policy, worker_id)
);
