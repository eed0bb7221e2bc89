-- The volume's JSON as last answered by its create or update: what a recreate on another
-- worker makes it again from (name and flags) when its worker is lost.
ALTER TABLE volumes ADD COLUMN IF NOT EXISTS last_json TEXT;

-- Machines and volumes an admin forgot while their worker was lost: the copies it still
-- has are removed when it comes back (`kind` is `machine` or `volume`).
CREATE TABLE IF NOT EXISTS lost_copies (
    id TEXT PRIMARY KEY NOT NULL,
    worker TEXT NOT NULL,
    kind TEXT NOT NULL
);
