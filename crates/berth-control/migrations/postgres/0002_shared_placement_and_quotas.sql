-- Several replicas on one database: what placement and quotas need that used to live in
-- each process's memory. SQLite gains the same columns in store.rs / workers.rs.

-- A worker's last heartbeat (as any replica recorded it) and what it reported then.
ALTER TABLE workers ADD COLUMN heartbeat_ms BIGINT;
ALTER TABLE workers ADD COLUMN used_cpus BIGINT NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN used_memory_mb BIGINT NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN used_disk_mb BIGINT NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN machine_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN running_count BIGINT NOT NULL DEFAULT 0;

-- What one create (or move) placed on a worker, counted until a heartbeat that follows
-- its end. `touched_at_ms` is refreshed by the replica running it; an untouched row is a
-- dead replica's and expires.
CREATE TABLE placements (
    machine_id TEXT PRIMARY KEY NOT NULL,
    worker TEXT NOT NULL,
    replica TEXT NOT NULL,
    cpus BIGINT NOT NULL,
    memory_mb BIGINT NOT NULL,
    disk_mb BIGINT NOT NULL,
    starts BIGINT NOT NULL,
    touched_at_ms BIGINT NOT NULL,
    ended_at_ms BIGINT
);
CREATE INDEX placements_by_worker ON placements(worker);

-- Start quotas: `running` is the workers' word (their notices, ordered by `state_event`),
-- `claim_ms` a start admitted and not yet confirmed by a notice.
ALTER TABLE machines ADD COLUMN running BIGINT NOT NULL DEFAULT 0;
ALTER TABLE machines ADD COLUMN state_event BIGINT;
ALTER TABLE machines ADD COLUMN claim_ms BIGINT;
CREATE INDEX machines_counted ON machines(app) WHERE running = 1 OR claim_ms IS NOT NULL;

-- Checks a start of `machine` against its org's started quotas and claims it, in one
-- statement (one round trip). Starts of one org are serialized by an advisory lock held
-- to the end of the statement's transaction. Answers `quota` empty when admitted, else the
-- quota that would be passed and how much of it is in use.
CREATE FUNCTION berth_claim_start(
    p_org TEXT, p_machine TEXT, p_cpus BIGINT, p_memory_mb BIGINT, p_now_ms BIGINT,
    p_live_after_ms BIGINT, p_max_started BIGINT, p_max_cpus BIGINT, p_max_memory_mb BIGINT
) RETURNS TABLE (quota TEXT, limit_value BIGINT, current_value BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    started BIGINT;
    cpus BIGINT;
    memory_mb BIGINT;
    held_cpus BIGINT;
    held_memory_mb BIGINT;
    held BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('berth-org:' || p_org, 0));
    SELECT COUNT(*), COALESCE(SUM(m.cpus), 0), COALESCE(SUM(m.memory_mb), 0),
           COUNT(*) FILTER (WHERE m.id = p_machine),
           COALESCE(SUM(m.cpus) FILTER (WHERE m.id = p_machine), 0),
           COALESCE(SUM(m.memory_mb) FILTER (WHERE m.id = p_machine), 0)
      INTO started, cpus, memory_mb, held, held_cpus, held_memory_mb
      FROM machines m JOIN apps a ON m.app = a.name
     WHERE a.org_slug = p_org AND (m.running = 1 OR m.claim_ms > p_live_after_ms);
    IF started - held + 1 > p_max_started THEN
        RETURN QUERY SELECT 'max_started_machines'::TEXT, p_max_started, started;
        RETURN;
    END IF;
    IF cpus - held_cpus + p_cpus > p_max_cpus THEN
        RETURN QUERY SELECT 'max_cpus'::TEXT, p_max_cpus, cpus;
        RETURN;
    END IF;
    IF memory_mb - held_memory_mb + p_memory_mb > p_max_memory_mb THEN
        RETURN QUERY SELECT 'max_memory_mb'::TEXT, p_max_memory_mb, memory_mb;
        RETURN;
    END IF;
    -- A Machine its worker already reports started needs no claim.
    UPDATE machines SET claim_ms = p_now_ms WHERE id = p_machine AND running = 0;
    RETURN QUERY SELECT ''::TEXT, 0::BIGINT, 0::BIGINT;
END
$$;
