//! The agent's durable local state, in SQLite (WAL). The record is the source of truth for
//! the Machines on this host; the host is reconciled against it after a crash.

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::error::{AgentError, Result};
use crate::record::MachineRecord;

/// A state change worth keeping in the Machine's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineEvent {
    pub kind: String,
    /// `user`, `restart_policy` or `system`.
    pub source: String,
    pub state: String,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct AgentStore {
    pool: SqlitePool,
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
];

impl AgentStore {
    pub async fn open(path: &Path) -> Result<AgentStore> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode survives a crash of this process; only an OS crash can
            // lose the newest commits, and recovery reconciles with the host anyway.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        Ok(AgentStore { pool })
    }

    /// Writes the record, and the event if any, in one transaction.
    pub async fn save(&self, record: &MachineRecord, event: Option<&MachineEvent>) -> Result<()> {
        self.save_returning_id(record, event).await.map(|_| ())
    }

    /// Like [`AgentStore::save`]; answers the new event's id.
    pub async fn save_returning_id(
        &self,
        record: &MachineRecord,
        event: Option<&MachineEvent>,
    ) -> Result<Option<i64>> {
        let json = serde_json::to_string(record)
            .map_err(|error| AgentError::Internal(format!("encode machine record: {error}")))?;
        let mut transaction = self.pool.begin().await?;
        sqlx::query("INSERT OR REPLACE INTO machines (id, app, state, record) VALUES (?, ?, ?, ?)")
            .bind(&record.id)
            .bind(&record.app)
            .bind(record.state.as_str())
            .bind(json)
            .execute(&mut *transaction)
            .await?;
        let mut event_id = None;
        if let Some(event) = event {
            let inserted = sqlx::query(
                "INSERT INTO machine_events (machine_id, kind, source, state, exit_code, reason, at_ms)
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&record.id)
            .bind(&event.kind)
            .bind(&event.source)
            .bind(&event.state)
            .bind(event.exit_code)
            .bind(&event.reason)
            .bind(event.at_ms)
            .execute(&mut *transaction)
            .await?;
            event_id = Some(inserted.last_insert_rowid());
        }
        transaction.commit().await?;
        Ok(event_id)
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

    pub async fn list_all(&self) -> Result<Vec<MachineRecord>> {
        let rows = sqlx::query("SELECT record FROM machines ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| decode(row.get::<String, _>(0)))
            .collect()
    }

    pub async fn delete(&self, id: &str) -> Result<()> {
        let mut transaction = self.pool.begin().await?;
        sqlx::query("DELETE FROM machines WHERE id = ?")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        sqlx::query("DELETE FROM machine_events WHERE machine_id = ?")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(())
    }

    pub async fn events(&self, id: &str) -> Result<Vec<MachineEvent>> {
        let rows = sqlx::query(
            "SELECT kind, source, state, exit_code, reason, at_ms FROM machine_events
             WHERE machine_id = ? ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| MachineEvent {
                kind: row.get(0),
                source: row.get(1),
                state: row.get(2),
                exit_code: row.get(3),
                reason: row.get(4),
                at_ms: row.get(5),
            })
            .collect())
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
        Ok(rows
            .into_iter()
            .map(|row| {
                (
                    row.get(0),
                    MachineEvent {
                        kind: row.get(1),
                        source: row.get(2),
                        state: row.get(3),
                        exit_code: row.get(4),
                        reason: row.get(5),
                        at_ms: row.get(6),
                    },
                )
            })
            .collect())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn decode(json: String) -> Result<MachineRecord> {
    serde_json::from_str(&json)
        .map_err(|error| AgentError::Internal(format!("decode machine record: {error}")))
}
