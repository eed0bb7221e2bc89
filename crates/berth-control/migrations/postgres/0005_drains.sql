-- A worker's last drain, shown by every replica. `replica` runs it; another takes it over
-- once that one is no longer live.

CREATE TABLE drains (
    worker TEXT PRIMARY KEY NOT NULL,
    replica TEXT,
    state TEXT NOT NULL,
    progress TEXT NOT NULL
);
