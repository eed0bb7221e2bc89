//! The agent's durable local state, in SQLite (WAL). The record is the source of truth for
//! the Machines on this host; the host is reconciled against it after a crash.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use tokio_util::task::AbortOnDropHandle;

use berth_api::{EventKind, EventSource, MachineState, UsageRecord};

use crate::error::{AgentError, Result};
use crate::record::MachineRecord;

/// A state change worth keeping in the Machine's history. Its kind, source and state are
/// stored as their wire names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MachineEvent {
    pub kind: EventKind,
    pub source: EventSource,
    pub state: MachineState,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct AgentStore {
    pool: SqlitePool,
    _checkpointer: Arc<AbortOnDropHandle<()>>,
    /// A file of [`RESERVE_BYTES`] beside the database, given up so that a rollback can
    /// still be written once a full disk has refused the step before it.
    reserve: Arc<std::path::PathBuf>,
}

/// The emergency reserve's size: room for the WAL frames of a few rollbacks.
pub const RESERVE_BYTES: usize = 4 << 20;

/// Bytes a WAL file may keep on disk after a checkpoint.
pub const JOURNAL_SIZE_LIMIT: &str = "4194304";

/// How often the WAL is checkpointed in the background.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Checkpoints a WAL database from a background task every `interval`. SQLite's automatic
/// checkpoint runs inside whichever commit crosses the WAL's size threshold, and with its
/// fsyncs that one commit (a start, say) takes milliseconds; checkpointed in the
/// background, the WAL stays under that threshold and the automatic one is only a
/// backstop for bursts. The task ends when the handle drops.
pub fn checkpoint_in_background(pool: SqlitePool, interval: Duration) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if pool.is_closed() {
                return;
            }
            if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&pool)
                .await
            {
                if pool.is_closed() {
                    return;
                }
                tracing::warn!(%error, "checkpointing the store's WAL");
            }
        }
    }))
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS machines (
        id TEXT PRIMARY KEY NOT NULL,
        app TEXT NOT NULL,
        state TEXT NOT NULL,
        record TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS machines_by_app ON machines(app)",
    "CREATE TABLE IF NOT EXISTS machine_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        machine_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        source TEXT NOT NULL,
        state TEXT NOT NULL,
        exit_code INTEGER,
        reason TEXT,
        at_ms INTEGER NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS events_by_machine ON machine_events(machine_id, seq)",
    // A Machine's config history, one row per create and update, written with the change
    // that made it and removed with the Machine.
    "CREATE TABLE IF NOT EXISTS machine_versions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        machine_id TEXT NOT NULL,
        version TEXT NOT NULL,
        config TEXT NOT NULL,
        at_ms INTEGER NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS versions_by_machine ON machine_versions(machine_id, seq)",
    // Append-only; AUTOINCREMENT so a sequence number is never reused, even after the
    // newest rows are compacted away.
    "CREATE TABLE IF NOT EXISTS usage_journal (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        machine_id TEXT NOT NULL,
        app TEXT NOT NULL,
        kind TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        cpus INTEGER NOT NULL,
        memory_mb INTEGER NOT NULL,
        storage_bytes INTEGER NOT NULL,
        basis TEXT
    )",
    "CREATE TABLE IF NOT EXISTS liveness (id INTEGER PRIMARY KEY CHECK (id = 1), at_ms INTEGER NOT NULL)",
    // The kernel's boot id when the agent last opened: a different one means the host
    // restarted in between.
    "CREATE TABLE IF NOT EXISTS host_boot (id INTEGER PRIMARY KEY CHECK (id = 1), boot_id TEXT NOT NULL)",
    // Volumes (the source of truth for this worker's volumes) and their snapshots.
    "CREATE TABLE IF NOT EXISTS volumes (
        id TEXT PRIMARY KEY NOT NULL,
        app TEXT NOT NULL,
        record TEXT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS volume_snapshots (
        id TEXT PRIMARY KEY NOT NULL,
        volume_id TEXT NOT NULL,
        record TEXT NOT NULL
    )",
];

impl AgentStore {
    pub async fn open(path: &Path) -> Result<AgentStore> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode survives a crash of this process; only an OS crash can
            // lose the newest commits, and recovery reconciles with the host anyway.
            .synchronous(SqliteSynchronous::Normal)
            // A WAL file grown by a burst goes back to this size once checkpointed.
            .pragma("journal_size_limit", JOURNAL_SIZE_LIMIT)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        let checkpointer = checkpoint_in_background(pool.clone(), CHECKPOINT_INTERVAL);
        let store = AgentStore {
            pool,
            _checkpointer: Arc::new(checkpointer),
            reserve: Arc::new(path.with_extension("reserve")),
        };
        if let Err(error) = store.refill_reserve().await {
            tracing::warn!(%error, "the store's emergency reserve could not be written");
        }
        Ok(store)
    }

    /// Writes the emergency reserve back if it was given up. Written, not sized, so that
    /// its blocks are really taken on every filesystem. An error means the disk has less
    /// room than the reserve: a create is refused before anything is recorded.
    pub async fn refill_reserve(&self) -> Result<()> {
        let path = self.reserve.clone();
        tokio::task::spawn_blocking(move || {
            if std::fs::metadata(&*path).is_ok_and(|meta| meta.len() == RESERVE_BYTES as u64) {
                return Ok(());
            }
            let partial = path.with_extension("reserve.tmp");
            let written = std::fs::write(&partial, vec![0u8; RESERVE_BYTES])
                .and_then(|()| std::fs::rename(&partial, &*path));
            if written.is_err() {
                let _ = std::fs::remove_file(&partial);
            }
            written
        })
        .await
        .map_err(|error| AgentError::Internal(format!("refilling the store's reserve: {error}")))?
        .map_err(|error| AgentError::Store(sqlx::Error::Io(error)))
    }

    /// Deletes a record whose operation failed, giving up the emergency reserve once if
    /// the disk is too full for even that.
    pub async fn delete_rollback(&self, id: &str) -> Result<()> {
        match self.delete(id).await {
            Err(error) if error.out_of_space() => {
                tracing::warn!(
                    machine = id,
                    "the disk is full: giving up the store's reserve to roll back"
                );
                let _ = tokio::fs::remove_file(&*self.reserve).await;
                self.delete(id).await
            }
            other => other,
        }
    }

    /// Writes the record, and the event if any, in one transaction.
    pub async fn save(&self, record: &MachineRecord, event: Option<&MachineEvent>) -> Result<()> {
        self.save_full(record, event, &[]).await.map(|_| ())
    }

    /// Like [`AgentStore::save`]; answers the new event's id.
    pub async fn save_returning_id(
        &self,
        record: &MachineRecord,
        event: Option<&MachineEvent>,
    ) -> Result<Option<i64>> {
        self.save_full(record, event, &[]).await
    }

    /// Writes the record, the event and usage journal entries in one transaction, so a
    /// billable transition is durable exactly when the state change is. The entries'
    /// `seq` is assigned here.
    pub async fn save_with_usage(
        &self,
        record: &MachineRecord,
        event: Option<&MachineEvent>,
        usage: &[UsageRecord],
    ) -> Result<()> {
        self.save_full(record, event, usage).await.map(|_| ())
    }

    /// The one write of a Machine's state: record, event and usage entries, atomically.
    /// Answers the new event's id.
    pub async fn save_full(
        &self,
        record: &MachineRecord,
        event: Option<&MachineEvent>,
        usage: &[UsageRecord],
    ) -> Result<Option<i64>> {
        self.save_versioned(record, event, usage, false).await
    }

    /// [`AgentStore::save_full`], and with `version` the record's config as a new entry
    /// of its history (create and update), in the same transaction.
    pub async fn save_versioned(
        &self,
        record: &MachineRecord,
        event: Option<&MachineEvent>,
        usage: &[UsageRecord],
        version: bool,
    ) -> Result<Option<i64>> {
        let json = serde_json::to_string(record)
            .map_err(|error| AgentError::Internal(format!("encode machine record: {error}")))?;
        let config =
            if version {
                Some(serde_json::to_string(&record.config).map_err(|error| {
                    AgentError::Internal(format!("encode machine config: {error}"))
                })?)
            } else {
                None
            };
        const UPSERT: &str =
            "INSERT OR REPLACE INTO machines (id, app, state, record) VALUES (?, ?, ?, ?);";
        const USAGE: &str = "INSERT INTO usage_journal
            (machine_id, app, kind, at_ms, cpus, memory_mb, storage_bytes, basis)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?);";
        const EVENT: &str = "INSERT INTO machine_events
            (machine_id, kind, source, state, exit_code, reason, at_ms)
            VALUES (?, ?, ?, ?, ?, ?, ?);";
        const VERSION: &str = "INSERT INTO machine_versions
            (machine_id, version, config, at_ms) VALUES (?, ?, ?, ?);";
        // One query of several statements (sqlx runs them in one trip to the connection's
        // thread, binding the arguments in order); the event goes last, so the last
        // inserted row id is the event's.
        let mut sql = String::from(UPSERT);
        for _ in usage {
            sql.push_str(USAGE);
        }
        if config.is_some() {
            sql.push_str(VERSION);
        }
        if event.is_some() {
            sql.push_str(EVENT);
        }
        let mut query = sqlx::query(&sql)
            .bind(&record.id)
            .bind(&record.app)
            .bind(record.state.as_str())
            .bind(json);
        for entry in usage {
            query = bind_usage(query, entry)?;
        }
        if let Some(config) = config {
            query = query
                .bind(&record.id)
                .bind(&record.instance_id)
                .bind(config)
                .bind(record.updated_at_ms);
        }
        if let Some(event) = event {
            query = query
                .bind(&record.id)
                .bind(event.kind.as_str())
                .bind(event.source.as_str())
                .bind(event.state.as_str())
                .bind(event.exit_code)
                .bind(&event.reason)
                .bind(event.at_ms);
        }
        if event.is_none() && usage.is_empty() && !version {
            // One statement is atomic by itself: no BEGIN and COMMIT round trips.
            query.execute(&self.pool).await?;
            return Ok(None);
        }
        let mut transaction = self.pool.begin().await?;
        let done = query.execute(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(event.map(|_| done.last_insert_rowid()))
    }

    /// Journal entries after `after_seq`, oldest first.
    pub async fn usage_since(&self, after_seq: u64, limit: u32) -> Result<Vec<UsageRecord>> {
        let rows = sqlx::query(
            "SELECT seq, machine_id, app, kind, at_ms, cpus, memory_mb, storage_bytes, basis
             FROM usage_journal WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let basis: Option<String> = row.get(8);
                Ok(UsageRecord {
                    seq: u64::try_from(row.get::<i64, _>(0)).unwrap_or_default(),
                    machine_id: row.get(1),
                    app: row.get(2),
                    kind: enum_parse(&row.get::<String, _>(3))?,
                    at_ms: row.get(4),
                    cpus: row.get(5),
                    memory_mb: row.get(6),
                    storage_bytes: u64::try_from(row.get::<i64, _>(7)).unwrap_or_default(),
                    basis: basis.as_deref().map(enum_parse).transpose()?,
                })
            })
            .collect()
    }

    /// Records that the agent was alive at `at_ms`: the best-known end of a run that died
    /// while the agent was down without leaving an exit time.
    pub async fn record_liveness(&self, at_ms: i64) -> Result<()> {
        sqlx::query("INSERT INTO liveness (id, at_ms) VALUES (1, ?) ON CONFLICT(id) DO UPDATE SET at_ms = excluded.at_ms")
            .bind(at_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records the current boot id; answers the one recorded before, if any.
    pub async fn swap_boot_id(&self, boot_id: &str) -> Result<Option<String>> {
        let mut transaction = self.pool.begin().await?;
        let previous = sqlx::query("SELECT boot_id FROM host_boot WHERE id = 1")
            .fetch_optional(&mut *transaction)
            .await?
            .map(|row| row.get::<String, _>(0));
        sqlx::query("INSERT INTO host_boot (id, boot_id) VALUES (1, ?) ON CONFLICT(id) DO UPDATE SET boot_id = excluded.boot_id")
            .bind(boot_id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(previous)
    }

    pub async fn last_liveness(&self) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT at_ms FROM liveness WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| row.get(0)))
    }

    /// Appends events to a Machine's history, in order, in one transaction.
    pub async fn add_events(&self, id: &str, events: &[MachineEvent]) -> Result<()> {
        let mut transaction = self.pool.begin().await?;
        for event in events {
            sqlx::query(
                "INSERT INTO machine_events (machine_id, kind, source, state, exit_code, reason, at_ms)
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(event.kind.as_str())
            .bind(event.source.as_str())
            .bind(event.state.as_str())
            .bind(event.exit_code)
            .bind(&event.reason)
            .bind(event.at_ms)
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// Writes a Machine's config history as another worker had it, oldest first, in one
    /// transaction (a Machine arriving by migration).
    pub async fn add_versions(&self, id: &str, versions: &[(String, String, i64)]) -> Result<()> {
        let mut transaction = self.pool.begin().await?;
        for (version, config, at_ms) in versions {
            sqlx::query(
                "INSERT INTO machine_versions (machine_id, version, config, at_ms) VALUES (?, ?, ?, ?)",
            )
            .bind(id)
            .bind(version)
            .bind(config)
            .bind(at_ms)
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Result<Option<MachineRecord>> {
        let row = sqlx::query("SELECT record FROM machines WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| decode(row.get::<String, _>(0))).transpose()
    }

    pub async fn list_app(&self, app: &str) -> Result<Vec<MachineRecord>> {
        let rows = sqlx::query("SELECT record FROM machines WHERE app = ? ORDER BY id")
            .bind(app)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| decode(row.get::<String, _>(0)))
            .collect()
    }

    pub async fn count(&self) -> Result<u64> {
        let row = sqlx::query("SELECT COUNT(*) FROM machines")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(row.get::<i64, _>(0)).unwrap_or_default())
    }

    /// The disk of every Machine, in MiB: each config's `guest.disk_mb`, `default_mb`
    /// where it names none. Summed in SQLite, so a heartbeat decodes no record.
    pub async fn disk_mb(&self, default_mb: u64) -> Result<u64> {
        let row = sqlx::query(
            "SELECT COALESCE(SUM(COALESCE(json_extract(record, '$.config.guest.disk_mb'), ?1)), 0)
             FROM machines",
        )
        .bind(i64::try_from(default_mb).unwrap_or(i64::MAX))
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(row.get::<i64, _>(0)).unwrap_or_default())
    }

    /// The id of the newest event of any Machine (0 when there is none).
    pub async fn last_event_id(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) FROM machine_events")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get::<i64, _>(0))
    }

    pub async fn list_all(&self) -> Result<Vec<MachineRecord>> {
        let rows = sqlx::query("SELECT record FROM machines ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| decode(row.get::<String, _>(0)))
            .collect()
    }

    pub async fn delete(&self, id: &str) -> Result<()> {
        self.delete_with_usage(id, &[]).await
    }

    /// Deletes the Machine's record and events and journals its end, atomically.
    pub async fn delete_with_usage(&self, id: &str, usage: &[UsageRecord]) -> Result<()> {
        let mut transaction = self.pool.begin().await?;
        for entry in usage {
            insert_usage(&mut transaction, entry).await?;
        }
        sqlx::query("DELETE FROM machines WHERE id = ?")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        sqlx::query("DELETE FROM machine_events WHERE machine_id = ?")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        sqlx::query("DELETE FROM machine_versions WHERE machine_id = ?")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(())
    }

    /// The Machine's config history, newest first: (version, config JSON, time).
    pub async fn versions(&self, id: &str) -> Result<Vec<(String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT version, config, at_ms FROM machine_versions
             WHERE machine_id = ? ORDER BY seq DESC",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect())
    }

    /// The newest `limit` events of each Machine of `app` (or of the one Machine `id`
    /// names), newest first, with their ids, in one query.
    pub async fn recent_events(
        &self,
        app: Option<&str>,
        id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, i64, MachineEvent)>> {
        let rows = sqlx::query(
            "SELECT machine_id, seq, kind, source, state, exit_code, reason, at_ms FROM (
                 SELECT e.*, ROW_NUMBER() OVER (PARTITION BY e.machine_id ORDER BY e.seq DESC) AS n
                 FROM machine_events e
                 WHERE (?1 IS NULL OR e.machine_id IN (SELECT id FROM machines WHERE app = ?1))
                   AND (?2 IS NULL OR e.machine_id = ?2)
             ) WHERE n <= ?3 ORDER BY machine_id, seq DESC",
        )
        .bind(app)
        .bind(id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| Ok((row.get(0), row.get(1), event_from(&row, 2)?)))
            .collect()
    }

    pub async fn events(&self, id: &str) -> Result<Vec<MachineEvent>> {
        let rows = sqlx::query(
            "SELECT kind, source, state, exit_code, reason, at_ms FROM machine_events
             WHERE machine_id = ? ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(|row| event_from(&row, 0)).collect()
    }

    /// Events with an id above `since`, oldest first, with their ids.
    pub async fn events_since(
        &self,
        id: &str,
        since: i64,
        limit: u32,
    ) -> Result<Vec<(i64, MachineEvent)>> {
        let rows = sqlx::query(
            "SELECT seq, kind, source, state, exit_code, reason, at_ms FROM machine_events
             WHERE machine_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(id)
        .bind(since)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| Ok((row.get(0), event_from(&row, 1)?)))
            .collect()
    }

    /// Every journal entry's sequence number, Machine and kind, oldest first: what the
    /// doctor checks for gaps, repeats and runs left open.
    pub async fn journal_outline(&self) -> Result<Vec<(i64, String, berth_api::UsageKind)>> {
        let rows = sqlx::query("SELECT seq, machine_id, kind FROM usage_journal ORDER BY seq")
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| {
                Ok((
                    row.get(0),
                    row.get(1),
                    enum_parse(&row.get::<String, _>(2))?,
                ))
            })
            .collect()
    }

    pub async fn save_volume(&self, record: &crate::volumes::VolumeRecord) -> Result<()> {
        self.save_volume_with_usage(record, &[]).await
    }

    /// Writes the volume's record and its usage journal entries in one transaction.
    pub async fn save_volume_with_usage(
        &self,
        record: &crate::volumes::VolumeRecord,
        usage: &[UsageRecord],
    ) -> Result<()> {
        let json = serde_json::to_string(record)
            .map_err(|error| AgentError::Internal(format!("encode volume record: {error}")))?;
        let mut transaction = self.pool.begin().await?;
        sqlx::query("INSERT OR REPLACE INTO volumes (id, app, record) VALUES (?, ?, ?)")
            .bind(&record.id)
            .bind(&record.app)
            .bind(json)
            .execute(&mut *transaction)
            .await?;
        for entry in usage {
            insert_usage(&mut transaction, entry).await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    pub async fn volume(&self, id: &str) -> Result<Option<crate::volumes::VolumeRecord>> {
        let row = sqlx::query("SELECT record FROM volumes WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| decode_json(&row.get::<String, _>(0), "volume"))
            .transpose()
    }

    /// The volumes of `app`, or every volume; oldest first.
    pub async fn volumes_of(&self, app: Option<&str>) -> Result<Vec<crate::volumes::VolumeRecord>> {
        let rows = match app {
            Some(app) => {
                sqlx::query("SELECT record FROM volumes WHERE app = ? ORDER BY rowid")
                    .bind(app)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT record FROM volumes ORDER BY rowid")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter()
            .map(|row| decode_json(&row.get::<String, _>(0), "volume"))
            .collect()
    }

    /// Deletes the volume's record and its snapshots' records in one transaction.
    pub async fn delete_volume(&self, id: &str) -> Result<()> {
        self.delete_volume_with_usage(id, &[]).await
    }

    /// Deletes the volume's and its snapshots' records and writes the usage journal
    /// entries, in one transaction.
    pub async fn delete_volume_with_usage(&self, id: &str, usage: &[UsageRecord]) -> Result<()> {
        let mut transaction = self.pool.begin().await?;
        for entry in usage {
            insert_usage(&mut transaction, entry).await?;
        }
        sqlx::query("DELETE FROM volume_snapshots WHERE volume_id = ?")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        sqlx::query("DELETE FROM volumes WHERE id = ?")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(())
    }

    pub async fn save_snapshot(&self, record: &crate::volumes::SnapshotRecord) -> Result<()> {
        let json = serde_json::to_string(record)
            .map_err(|error| AgentError::Internal(format!("encode snapshot record: {error}")))?;
        sqlx::query("INSERT INTO volume_snapshots (id, volume_id, record) VALUES (?, ?, ?)")
            .bind(&record.id)
            .bind(&record.volume_id)
            .bind(json)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets one snapshot (its retention ended).
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM volume_snapshots WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn snapshot(&self, id: &str) -> Result<Option<crate::volumes::SnapshotRecord>> {
        let row = sqlx::query("SELECT record FROM volume_snapshots WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| decode_json(&row.get::<String, _>(0), "snapshot"))
            .transpose()
    }

    /// The volume's snapshots, oldest first.
    pub async fn snapshots_of(
        &self,
        volume_id: &str,
    ) -> Result<Vec<crate::volumes::SnapshotRecord>> {
        let rows =
            sqlx::query("SELECT record FROM volume_snapshots WHERE volume_id = ? ORDER BY rowid")
                .bind(volume_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| decode_json(&row.get::<String, _>(0), "snapshot"))
            .collect()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

async fn insert_usage(
    transaction: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    entry: &UsageRecord,
) -> Result<()> {
    let query = sqlx::query(
        "INSERT INTO usage_journal (machine_id, app, kind, at_ms, cpus, memory_mb, storage_bytes, basis)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    );
    bind_usage(query, entry)?
        .execute(&mut **transaction)
        .await?;
    Ok(())
}

type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Binds a usage entry's eight columns, in the journal's column order.
fn bind_usage<'q>(query: SqliteQuery<'q>, entry: &'q UsageRecord) -> Result<SqliteQuery<'q>> {
    Ok(query
        .bind(&entry.machine_id)
        .bind(&entry.app)
        .bind(enum_text(&entry.kind)?)
        .bind(entry.at_ms)
        .bind(entry.cpus)
        .bind(entry.memory_mb)
        .bind(i64::try_from(entry.storage_bytes).unwrap_or(i64::MAX))
        .bind(entry.basis.as_ref().map(enum_text).transpose()?))
}

/// The serde name of a unit enum variant, as stored in text columns.
fn enum_text<T: serde::Serialize>(value: &T) -> Result<String> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(text)) => Ok(text),
        _ => Err(AgentError::Internal(
            "usage enum did not encode as text".into(),
        )),
    }
}

fn enum_parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).map_err(|error| {
        AgentError::Internal(format!("decode {text:?} from the usage journal: {error}"))
    })
}

/// An event from its six columns (kind, source, state, exit code, reason, time), the
/// first at `at`.
fn event_from(row: &sqlx::sqlite::SqliteRow, at: usize) -> Result<MachineEvent> {
    fn name<T>(
        row: &sqlx::sqlite::SqliteRow,
        column: usize,
        parse: fn(&str) -> Option<T>,
    ) -> Result<T> {
        let text: String = row.get(column);
        parse(&text)
            .ok_or_else(|| AgentError::Internal(format!("decode {text:?} from the machine events")))
    }
    Ok(MachineEvent {
        kind: name(row, at, EventKind::parse)?,
        source: name(row, at + 1, EventSource::parse)?,
        state: name(row, at + 2, MachineState::parse)?,
        exit_code: row.get(at + 3),
        reason: row.get(at + 4),
        at_ms: row.get(at + 5),
    })
}

fn decode(json: String) -> Result<MachineRecord> {
    serde_json::from_str(&json)
        .map_err(|error| AgentError::Internal(format!("decode machine record: {error}")))
}

fn decode_json<T: serde::de::DeserializeOwned>(json: &str, what: &str) -> Result<T> {
    serde_json::from_str(json)
        .map_err(|error| AgentError::Internal(format!("decode {what} record: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api::UsageKind;

    async fn store() -> (tempfile::TempDir, AgentStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = AgentStore::open(&dir.path().join("agent.db"))
            .await
            .expect("open");
        (dir, store)
    }

    #[tokio::test]
    async fn the_reserve_is_written_at_open_and_refilled_once_given_up() {
        let (dir, store) = store().await;
        let reserve = dir.path().join("agent.reserve");
        let size = || std::fs::metadata(&reserve).map(|meta| meta.len()).ok();
        assert_eq!(size(), Some(RESERVE_BYTES as u64));
        std::fs::remove_file(&reserve).expect("give the reserve up");
        store.refill_reserve().await.expect("refill");
        assert_eq!(size(), Some(RESERVE_BYTES as u64));
    }

    #[tokio::test]
    async fn events_are_stored_under_their_wire_names_and_read_back_typed() {
        let (_dir, store) = store().await;
        let event = MachineEvent {
            kind: EventKind::StartFailed,
            source: EventSource::RestartPolicy,
            state: MachineState::Failed,
            exit_code: Some(3),
            reason: Some("no such file".into()),
            at_ms: 42,
        };
        store
            .add_events("m1", std::slice::from_ref(&event))
            .await
            .expect("add");
        let raw: (String, String, String) =
            sqlx::query_as("SELECT kind, source, state FROM machine_events")
                .fetch_one(&store.pool)
                .await
                .expect("raw row");
        assert_eq!(
            raw,
            (
                "start_failed".into(),
                "restart_policy".into(),
                "failed".into()
            )
        );
        assert_eq!(
            store.events("m1").await.expect("events"),
            std::slice::from_ref(&event)
        );
        let (_, paged) = store
            .events_since("m1", 0, 10)
            .await
            .expect("page")
            .pop()
            .expect("one event");
        assert_eq!(paged, event);
    }

    #[tokio::test]
    async fn every_kind_and_source_an_older_agent_wrote_still_reads() {
        let (_dir, store) = store().await;
        for kind in EventKind::ALL {
            for source in EventSource::ALL {
                sqlx::query(
                    "INSERT INTO machine_events (machine_id, kind, source, state, at_ms)
                     VALUES ('m1', ?, ?, 'stopped', 1)",
                )
                .bind(kind.as_str())
                .bind(source.as_str())
                .execute(&store.pool)
                .await
                .expect("insert");
            }
        }
        let events = store.events("m1").await.expect("events");
        let read: Vec<(EventKind, EventSource)> = events
            .iter()
            .map(|event| (event.kind, event.source))
            .collect();
        let written: Vec<(EventKind, EventSource)> = EventKind::ALL
            .iter()
            .flat_map(|kind| EventSource::ALL.iter().map(|source| (*kind, *source)))
            .collect();
        assert_eq!(read, written);
    }

    fn event(kind: EventKind, at_ms: i64) -> MachineEvent {
        MachineEvent {
            kind,
            source: EventSource::User,
            state: MachineState::Stopped,
            exit_code: None,
            reason: None,
            at_ms,
        }
    }

    #[tokio::test]
    async fn versions_are_written_with_their_change_and_go_with_the_machine() {
        let (_dir, store) = store().await;
        let mut record = crate::record::tests::record_in(MachineState::Created);
        record.config.image = "first".into();
        store
            .save_versioned(&record, Some(&event(EventKind::Create, 1)), &[], true)
            .await
            .expect("create");
        // A change that is not a new config adds no version.
        store
            .save_full(&record, Some(&event(EventKind::Start, 2)), &[])
            .await
            .expect("start");
        record.instance_id = "02".into();
        record.config.image = "second".into();
        record.updated_at_ms = 3;
        store
            .save_versioned(&record, Some(&event(EventKind::Update, 3)), &[], true)
            .await
            .expect("update");
        let versions = store.versions(&record.id).await.expect("versions");
        let seen: Vec<(&str, i64)> = versions
            .iter()
            .map(|(version, _, at)| (version.as_str(), *at))
            .collect();
        assert_eq!(seen, [("02", 3), ("01", 1)]);
        assert!(versions[0].1.contains("second") && versions[1].1.contains("first"));
        store.delete(&record.id).await.expect("delete");
        assert!(store
            .versions(&record.id)
            .await
            .expect("versions")
            .is_empty());
    }

    #[tokio::test]
    async fn recent_events_are_the_newest_of_each_machine() {
        let (_dir, store) = store().await;
        let mut one = crate::record::tests::record_in(MachineState::Stopped);
        let mut two = one.clone();
        one.id = "m1".into();
        two.id = "m2".into();
        store.save(&one, None).await.expect("one");
        store.save(&two, None).await.expect("two");
        let kinds = [EventKind::Create, EventKind::Start, EventKind::Stop];
        for (at, kind) in kinds.iter().enumerate() {
            let at = i64::try_from(at).expect("small");
            store
                .add_events("m1", &[event(*kind, at)])
                .await
                .expect("m1");
            store
                .add_events("m2", &[event(*kind, at)])
                .await
                .expect("m2");
        }
        let recent = store
            .recent_events(Some("app"), None, 2)
            .await
            .expect("recent");
        let seen: Vec<(&str, EventKind)> = recent
            .iter()
            .map(|(id, _, event)| (id.as_str(), event.kind))
            .collect();
        assert_eq!(
            seen,
            [
                ("m1", EventKind::Stop),
                ("m1", EventKind::Start),
                ("m2", EventKind::Stop),
                ("m2", EventKind::Start)
            ]
        );
        let only = store
            .recent_events(None, Some("m2"), 10)
            .await
            .expect("one machine");
        assert_eq!(only.len(), 3);
        assert!(only.iter().all(|(id, ..)| id == "m2"));
        assert!(only.windows(2).all(|pair| pair[0].1 > pair[1].1));
        assert!(store
            .recent_events(Some("other"), None, 10)
            .await
            .expect("none")
            .is_empty());
    }

    #[tokio::test]
    async fn an_unknown_kind_is_an_error_not_a_guess() {
        let (_dir, store) = store().await;
        sqlx::query(
            "INSERT INTO machine_events (machine_id, kind, source, state, at_ms)
             VALUES ('m1', 'teleport', 'user', 'stopped', 1)",
        )
        .execute(&store.pool)
        .await
        .expect("insert");
        assert!(store.events("m1").await.is_err());
    }

    #[tokio::test]
    async fn a_volume_is_journaled_with_its_record_and_once_per_change() {
        let (_dir, store) = store().await;
        let mut record = crate::volumes::VolumeRecord {
            key: None,
            id: "vol_0123456789abcdef".into(),
            app: "a".into(),
            name: "data".into(),
            region: "local".into(),
            size_gb: 1,
            created_at_ms: 10,
            snapshot_retention: 5,
            auto_backup_enabled: false,
            attached_machine: None,
            pending: None,
            copied_pass: None,
            move_grant: None,
        };
        let created = crate::metering::volume_created(&record, 10);
        store
            .save_volume_with_usage(&record, &[created])
            .await
            .expect("create");
        record.size_gb = 3;
        let extended = crate::metering::volume_extended(&record, 20);
        store
            .save_volume_with_usage(&record, &[extended])
            .await
            .expect("extend");
        // A write without a change of size journals nothing.
        store.save_volume(&record).await.expect("update");
        let deleted = crate::metering::volume_deleted(&record, 30);
        store
            .delete_volume_with_usage(&record.id, &[deleted])
            .await
            .expect("delete");
        assert!(store.volume(&record.id).await.expect("read").is_none());
        let journal = store.usage_since(0, 100).await.expect("journal");
        let seen: Vec<(&str, UsageKind, i64, u64)> = journal
            .iter()
            .map(|entry| {
                (
                    entry.machine_id.as_str(),
                    entry.kind,
                    entry.at_ms,
                    entry.storage_bytes,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("vol_0123456789abcdef", UsageKind::Created, 10, 1 << 30),
                ("vol_0123456789abcdef", UsageKind::Storage, 20, 3 << 30),
                ("vol_0123456789abcdef", UsageKind::Destroyed, 30, 3 << 30),
            ]
        );
    }
}
