-- Fly's standbys: Machine `standby_id` stands by for `target_id`; and the claims that
-- make one replica start a standby once per outage of its target's worker.

CREATE TABLE standbys (
    standby_id TEXT NOT NULL,
    target_id TEXT NOT NULL,
    app TEXT NOT NULL,
    PRIMARY KEY (standby_id, target_id)
);
CREATE INDEX standbys_by_target ON standbys(target_id);

CREATE TABLE standby_starts (
    standby_id TEXT NOT NULL,
    outage TEXT NOT NULL,
    claimed_at_ms BIGINT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (standby_id, outage)
);
