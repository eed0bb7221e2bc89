-- Several control plane replicas on one database: each stamps its row in `replicas`, and
-- an idempotent call's claim and a move record the replica that runs them, so another
-- replica takes them over only once that one is no longer live.

CREATE TABLE replicas (
    id TEXT PRIMARY KEY NOT NULL,
    seen_ms BIGINT NOT NULL
);

ALTER TABLE idempotency ADD COLUMN replica TEXT;
ALTER TABLE migrations ADD COLUMN replica TEXT;
