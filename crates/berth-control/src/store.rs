//! The control plane's store: orgs, apps, and the index of which worker holds each Machine.
//! The workers hold the Machines' full records.

use std::path::Path;
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRow {
    pub id: String,
    pub name: String,
    pub org_slug: String,
    pub created_at_ms: i64,
}

/// An org: its slug (the key), its display name (the slug when none was given) and when
/// it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgRow {
    pub slug: String,
    pub name: String,
    pub created_at_ms: i64,
}

fn volume_row(row: &sqlx::sqlite::SqliteRow) -> VolumeIndexRow {
    VolumeIndexRow {
        id: row.get(0),
        app: row.get(1),
        worker: row.get(2),
        size_gb: row.get(3),
    }
}

fn org_row(row: sqlx::sqlite::SqliteRow) -> OrgRow {
    let slug: String = row.get(0);
    let name: Option<String> = row.get(1);
    OrgRow {
        name: name.unwrap_or_else(|| slug.clone()),
        slug,
        created_at_ms: row.get(2),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineIndexRow {
    pub id: String,
    pub app: String,
    pub name: String,
    pub worker: String,
    /// What start's quota check counts, kept here so that start need not ask the worker.
    /// `None` for a row indexed before it was kept, or after an update whose outcome is
    /// unknown: start then asks the worker once and keeps the answer.
    pub size: Option<MachineSize>,
}

/// A Machine's CPUs and memory, as its config on the worker has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineSize {
    pub cpus: u32,
    pub memory_mb: u32,
}

impl MachineSize {
    pub fn of(guest: &berth_api::GuestConfig) -> MachineSize {
        MachineSize {
            cpus: guest.cpus,
            memory_mb: guest.memory_mb,
        }
    }
}

/// Reads a row selected as `id, app, name, worker, cpus, memory_mb`.
fn index_row(row: &sqlx::sqlite::SqliteRow) -> MachineIndexRow {
    let cpus: Option<i64> = row.get(4);
    let memory_mb: Option<i64> = row.get(5);
    let size = match (cpus, memory_mb) {
        (Some(cpus), Some(memory_mb)) => u32::try_from(cpus)
            .ok()
            .zip(u32::try_from(memory_mb).ok())
            .map(|(cpus, memory_mb)| MachineSize { cpus, memory_mb }),
        _ => None,
    };
    MachineIndexRow {
        id: row.get(0),
        app: row.get(1),
        name: row.get(2),
        worker: row.get(3),
        size,
    }
}

#[derive(Debug, Clone)]
pub struct ControlStore {
    pool: SqlitePool,
    _checkpointer: std::sync::Arc<tokio_util::task::AbortOnDropHandle<()>>,
}

/// The outcome of inserting a row that must be unique.
#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    Yes,
    AlreadyExists,
}

/// The WAL is truncated to this many bytes after a checkpoint (as in the agent's store).
const JOURNAL_SIZE_LIMIT: &str = "4194304";
/// How often the WAL is checkpointed in the background.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Checkpoints the WAL from a background task, so that SQLite's automatic checkpoint,
/// with its fsyncs, does not run inside a request's commit (a start, say). The task ends
/// when the handle drops.
fn checkpoint_in_background(pool: SqlitePool) -> tokio_util::task::AbortOnDropHandle<()> {
    tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
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
                tracing::warn!(%error, "checkpointing the control store's WAL");
            }
        }
    }))
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS orgs (slug TEXT PRIMARY KEY NOT NULL, created_at_ms INTEGER NOT NULL, name TEXT)",
    "CREATE TABLE IF NOT EXISTS apps (
        id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL UNIQUE,
        org_slug TEXT NOT NULL REFERENCES orgs(slug),
        created_at_ms INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS machines (
        id TEXT PRIMARY KEY NOT NULL,
        app TEXT NOT NULL,
        name TEXT NOT NULL,
        worker TEXT NOT NULL,
        last_json TEXT,
        cpus INTEGER,
        memory_mb INTEGER,
        UNIQUE (app, name)
    )",
    // Destroyed Machines, as last known with state `destroyed`, for `include_deleted`;
    // kept for TOMBSTONE_MS after the destroy, then dropped.
    "CREATE TABLE IF NOT EXISTS destroyed_machines (
        id TEXT PRIMARY KEY NOT NULL,
        app TEXT NOT NULL,
        json TEXT NOT NULL,
        destroyed_at_ms INTEGER NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS destroyed_machines_by_app ON destroyed_machines(app, destroyed_at_ms)",
    // Which worker holds each volume (the worker has its record), and each snapshot's
    // volume, so a create from a snapshot goes to the snapshot's worker.
    // `size_gb` is what the org's volume quota counts.
    "CREATE TABLE IF NOT EXISTS volumes (
        id TEXT PRIMARY KEY NOT NULL,
        app TEXT NOT NULL,
        worker TEXT NOT NULL,
        size_gb INTEGER NOT NULL DEFAULT 0
    )",
    "CREATE INDEX IF NOT EXISTS volumes_by_app ON volumes(app)",
    "CREATE TABLE IF NOT EXISTS volume_snapshots (
        id TEXT PRIMARY KEY NOT NULL,
        volume_id TEXT NOT NULL,
        worker TEXT NOT NULL
    )",
];

/// How long a destroyed Machine stays listed by `include_deleted=true`.
pub const TOMBSTONE_MS: i64 = 48 * 3600 * 1000;

/// Where a volume lives: its index row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeIndexRow {
    pub id: String,
    pub app: String,
    pub worker: String,
    /// Provisioned size, as the org's quota counts it.
    pub size_gb: u32,
}

/// Adds `size_gb` to a `volumes` table made before it existed.
async fn add_volume_size_column(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info('volumes')")
        .fetch_all(pool)
        .await?;
    if !columns.iter().any(|name| name == "size_gb") {
        sqlx::query("ALTER TABLE volumes ADD COLUMN size_gb INTEGER NOT NULL DEFAULT 0")
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Adds the size columns to a `machines` table made before they existed. Its rows keep
/// them empty until a start fills them from the worker.
async fn add_size_columns(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info('machines')")
        .fetch_all(pool)
        .await?;
    for column in ["cpus", "memory_mb"] {
        if !columns.iter().any(|name| name == column) {
            sqlx::query(&format!("ALTER TABLE machines ADD COLUMN {column} INTEGER"))
                .execute(pool)
                .await?;
        }
    }
    Ok(())
}

/// Adds `name` to an `orgs` table made before it existed; those orgs are named by slug.
async fn add_org_name_column(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info('orgs')")
        .fetch_all(pool)
        .await?;
    if !columns.iter().any(|name| name == "name") {
        sqlx::query("ALTER TABLE orgs ADD COLUMN name TEXT")
            .execute(pool)
            .await?;
    }
    Ok(())
}

impl ControlStore {
    pub async fn open(path: &Path) -> Result<ControlStore, sqlx::Error> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            // Checkpoints run in the background, not inside a request's commit.
            .pragma("journal_size_limit", JOURNAL_SIZE_LIMIT)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        add_size_columns(&pool).await?;
        add_org_name_column(&pool).await?;
        add_volume_size_column(&pool).await?;
        let checkpointer = checkpoint_in_background(pool.clone());
        Ok(ControlStore {
            pool,
            _checkpointer: std::sync::Arc::new(checkpointer),
        })
    }

    pub async fn ensure_org(&self, slug: &str, now_ms: i64) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT OR IGNORE INTO orgs (slug, created_at_ms) VALUES (?, ?)")
            .bind(slug)
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn org_exists(&self, slug: &str) -> Result<bool, sqlx::Error> {
        let row = sqlx::query("SELECT 1 FROM orgs WHERE slug = ?")
            .bind(slug)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    pub async fn insert_app(&self, app: &AppRow) -> Result<Inserted, sqlx::Error> {
        let result =
            sqlx::query("INSERT INTO apps (id, name, org_slug, created_at_ms) VALUES (?, ?, ?, ?)")
                .bind(&app.id)
                .bind(&app.name)
                .bind(&app.org_slug)
                .bind(app.created_at_ms)
                .execute(&self.pool)
                .await;
        unique(result)
    }

    pub async fn app(&self, name: &str) -> Result<Option<AppRow>, sqlx::Error> {
        let row = sqlx::query("SELECT id, name, org_slug, created_at_ms FROM apps WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| AppRow {
            id: row.get(0),
            name: row.get(1),
            org_slug: row.get(2),
            created_at_ms: row.get(3),
        }))
    }

    pub async fn apps(&self) -> Result<Vec<AppRow>, sqlx::Error> {
        let rows = sqlx::query("SELECT id, name, org_slug, created_at_ms FROM apps ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| AppRow {
                id: row.get(0),
                name: row.get(1),
                org_slug: row.get(2),
                created_at_ms: row.get(3),
            })
            .collect())
    }

    pub async fn delete_app(&self, name: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM apps WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await?;
        self.forget_destroyed_machines(name).await
    }

    pub async fn insert_machine(&self, row: &MachineIndexRow) -> Result<Inserted, sqlx::Error> {
        let result = sqlx::query(
            "INSERT INTO machines (id, app, name, worker, cpus, memory_mb) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&row.id)
        .bind(&row.app)
        .bind(&row.name)
        .bind(&row.worker)
        .bind(row.size.map(|size| i64::from(size.cpus)))
        .bind(row.size.map(|size| i64::from(size.memory_mb)))
        .execute(&self.pool)
        .await;
        unique(result)
    }

    /// Keeps the Machine's size as its worker now has it; `None` when that is unknown.
    pub async fn set_machine_size(
        &self,
        id: &str,
        size: Option<MachineSize>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE machines SET cpus = ?, memory_mb = ? WHERE id = ?")
            .bind(size.map(|size| i64::from(size.cpus)))
            .bind(size.map(|size| i64::from(size.memory_mb)))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn machine(
        &self,
        app: &str,
        id: &str,
    ) -> Result<Option<MachineIndexRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT id, app, name, worker, cpus, memory_mb FROM machines WHERE app = ? AND id = ?",
        )
        .bind(app)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(index_row))
    }

    pub async fn machines(&self, app: &str) -> Result<Vec<MachineIndexRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, app, name, worker, cpus, memory_mb FROM machines WHERE app = ? ORDER BY id",
        )
        .bind(app)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(index_row).collect())
    }

    /// Every Machine the index places on `worker`.
    pub async fn machines_on(&self, worker: &str) -> Result<Vec<MachineIndexRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, app, name, worker, cpus, memory_mb FROM machines WHERE worker = ? ORDER BY id",
        )
        .bind(worker)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(index_row).collect())
    }

    /// The Machine JSON last answered by its worker.
    pub async fn remember_machine(&self, id: &str, json: &str) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE machines SET last_json = ? WHERE id = ?")
            .bind(json)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn last_known_machine(&self, id: &str) -> Result<Option<String>, sqlx::Error> {
        let row = sqlx::query("SELECT last_json FROM machines WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.and_then(|row| row.get::<Option<String>, _>(0)))
    }

    /// Forgets a destroyed Machine's index entry and keeps `json` (its Machine JSON,
    /// state `destroyed`) as its tombstone, in one transaction; drops tombstones older
    /// than [`TOMBSTONE_MS`].
    pub async fn bury_machine(
        &self,
        id: &str,
        app: &str,
        json: &str,
        now_ms: i64,
    ) -> Result<(), sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        sqlx::query("DELETE FROM machines WHERE id = ?")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        sqlx::query(
            "INSERT OR REPLACE INTO destroyed_machines (id, app, json, destroyed_at_ms) VALUES (?, ?, ?, ?)",
        )
        .bind(id)
        .bind(app)
        .bind(json)
        .bind(now_ms)
        .execute(&mut *transaction)
        .await?;
        sqlx::query("DELETE FROM destroyed_machines WHERE destroyed_at_ms < ?")
            .bind(now_ms.saturating_sub(TOMBSTONE_MS))
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await
    }

    /// The app's Machines destroyed within [`TOMBSTONE_MS`] of `now_ms`, as their JSON.
    pub async fn destroyed_machines(
        &self,
        app: &str,
        now_ms: i64,
    ) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT json FROM destroyed_machines WHERE app = ? AND destroyed_at_ms >= ?
             ORDER BY destroyed_at_ms, id",
        )
        .bind(app)
        .bind(now_ms.saturating_sub(TOMBSTONE_MS))
        .fetch_all(&self.pool)
        .await
    }

    /// Drops the tombstones of an app that is deleted, so a new app of the same name
    /// does not list them.
    pub async fn forget_destroyed_machines(&self, app: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM destroyed_machines WHERE app = ?")
            .bind(app)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn delete_machine(&self, id: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM machines WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub async fn orgs(&self) -> Result<Vec<OrgRow>, sqlx::Error> {
        let rows = sqlx::query("SELECT slug, name, created_at_ms FROM orgs ORDER BY slug")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(org_row).collect())
    }

    pub async fn org(&self, slug: &str) -> Result<Option<OrgRow>, sqlx::Error> {
        let row = sqlx::query("SELECT slug, name, created_at_ms FROM orgs WHERE slug = ?")
            .bind(slug)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(org_row))
    }

    /// Adds an org; `name` is its display name (`None`: the slug).
    pub async fn insert_org(
        &self,
        slug: &str,
        name: Option<&str>,
        now_ms: i64,
    ) -> Result<Inserted, sqlx::Error> {
        let result = sqlx::query("INSERT INTO orgs (slug, name, created_at_ms) VALUES (?, ?, ?)")
            .bind(slug)
            .bind(name)
            .bind(now_ms)
            .execute(&self.pool)
            .await;
        unique(result)
    }

    /// Machines of every app of `org`.
    pub async fn count_org_machines(&self, org: &str) -> Result<u64, sqlx::Error> {
        let row = sqlx::query(
            "SELECT COUNT(*) FROM machines JOIN apps ON machines.app = apps.name WHERE apps.org_slug = ?",
        )
        .bind(org)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(row.get::<i64, _>(0)).unwrap_or(0))
    }

    pub async fn insert_volume(&self, row: &VolumeIndexRow) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT OR REPLACE INTO volumes (id, app, worker, size_gb) VALUES (?, ?, ?, ?)",
        )
        .bind(&row.id)
        .bind(&row.app)
        .bind(&row.worker)
        .bind(row.size_gb)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn set_volume_size(&self, id: &str, size_gb: u32) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE volumes SET size_gb = ? WHERE id = ?")
            .bind(size_gb)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records a size the worker answered with; sizes only grow, so a late answer of an
    /// earlier extend never shrinks a later one.
    pub async fn grow_volume_size(&self, id: &str, size_gb: u32) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE volumes SET size_gb = MAX(size_gb, ?) WHERE id = ?")
            .bind(size_gb)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Gives back a failed extend's reservation, unless another extend has reserved
    /// since (then its size stands).
    pub async fn release_volume_size(
        &self,
        id: &str,
        reserved_gb: u32,
        old_gb: u32,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE volumes SET size_gb = ? WHERE id = ? AND size_gb = ?")
            .bind(old_gb)
            .bind(id)
            .bind(reserved_gb)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// How many volumes the org's apps have, and their provisioned GB summed.
    pub async fn org_volume_totals(&self, org: &str) -> Result<(u64, u64), sqlx::Error> {
        let row = sqlx::query(
            "SELECT COUNT(*), COALESCE(SUM(volumes.size_gb), 0) FROM volumes
             JOIN apps ON volumes.app = apps.name WHERE apps.org_slug = ?",
        )
        .bind(org)
        .fetch_one(&self.pool)
        .await?;
        Ok((
            u64::try_from(row.get::<i64, _>(0)).unwrap_or(0),
            u64::try_from(row.get::<i64, _>(1)).unwrap_or(0),
        ))
    }

    pub async fn volume(&self, app: &str, id: &str) -> Result<Option<VolumeIndexRow>, sqlx::Error> {
        let row =
            sqlx::query("SELECT id, app, worker, size_gb FROM volumes WHERE app = ? AND id = ?")
                .bind(app)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.as_ref().map(volume_row))
    }

    pub async fn volumes(&self, app: &str) -> Result<Vec<VolumeIndexRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, app, worker, size_gb FROM volumes WHERE app = ? ORDER BY rowid",
        )
        .bind(app)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(volume_row).collect())
    }

    /// Forgets the volume and its snapshots.
    pub async fn delete_volume(&self, id: &str) -> Result<(), sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        sqlx::query("DELETE FROM volume_snapshots WHERE volume_id = ?")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        sqlx::query("DELETE FROM volumes WHERE id = ?")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await
    }

    /// Moves the index rows of these volumes and of their snapshots to `worker`: part of
    /// a move's cutover transaction, so volume calls follow the Machine at once.
    pub async fn move_volumes(
        connection: &mut sqlx::SqliteConnection,
        ids: &[String],
        worker: &str,
    ) -> Result<(), sqlx::Error> {
        for id in ids {
            sqlx::query("UPDATE volumes SET worker = ? WHERE id = ?")
                .bind(worker)
                .bind(id)
                .execute(&mut *connection)
                .await?;
            sqlx::query("UPDATE volume_snapshots SET worker = ? WHERE volume_id = ?")
                .bind(worker)
                .bind(id)
                .execute(&mut *connection)
                .await?;
        }
        Ok(())
    }

    pub async fn insert_snapshot(
        &self,
        id: &str,
        volume_id: &str,
        worker: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT OR REPLACE INTO volume_snapshots (id, volume_id, worker) VALUES (?, ?, ?)",
        )
        .bind(id)
        .bind(volume_id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The snapshot's volume and worker, if the snapshot belongs to a volume of `app`.
    pub async fn snapshot(
        &self,
        app: &str,
        id: &str,
    ) -> Result<Option<VolumeIndexRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT v.id, v.app, s.worker, v.size_gb FROM volume_snapshots s JOIN volumes v ON v.id = s.volume_id
             WHERE s.id = ? AND v.app = ?",
        )
        .bind(id)
        .bind(app)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(volume_row))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn unique(
    result: Result<sqlx::sqlite::SqliteQueryResult, sqlx::Error>,
) -> Result<Inserted, sqlx::Error> {
    match result {
        Ok(_) => Ok(Inserted::Yes),
        Err(sqlx::Error::Database(error)) if error.is_unique_violation() => {
            Ok(Inserted::AlreadyExists)
        }
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn orgs_from_before_names_gain_the_column_and_are_named_by_slug() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.db");
        {
            let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
                .expect("options")
                .create_if_missing(true);
            let old = SqlitePoolOptions::new()
                .connect_with(options)
                .await
                .expect("old store");
            sqlx::query(
                "CREATE TABLE orgs (slug TEXT PRIMARY KEY NOT NULL, created_at_ms INTEGER NOT NULL)",
            )
            .execute(&old)
            .await
            .expect("old schema");
            sqlx::query("INSERT INTO orgs (slug, created_at_ms) VALUES ('acme', 7)")
                .execute(&old)
                .await
                .expect("old row");
            old.close().await;
        }
        let store = ControlStore::open(&path).await.expect("migrated");
        let acme = store.org("acme").await.expect("read").expect("row");
        assert_eq!((acme.name.as_str(), acme.created_at_ms), ("acme", 7));
        assert_eq!(
            store
                .insert_org("new", Some("New Org"), 8)
                .await
                .expect("insert"),
            Inserted::Yes
        );
        let names: Vec<(String, String)> = store
            .orgs()
            .await
            .expect("orgs")
            .into_iter()
            .map(|org| (org.slug, org.name))
            .collect();
        assert_eq!(
            names,
            [
                ("acme".into(), "acme".into()),
                ("new".into(), "New Org".into())
            ]
        );
        drop(store);
        // Opening again leaves the column as it is.
        let store = ControlStore::open(&path).await.expect("reopened");
        assert_eq!(store.orgs().await.expect("orgs").len(), 2);
    }

    #[tokio::test]
    async fn an_index_from_before_sizes_gains_the_columns_and_keeps_its_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.db");
        {
            let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
                .expect("options")
                .create_if_missing(true);
            let old = SqlitePoolOptions::new()
                .connect_with(options)
                .await
                .expect("old store");
            sqlx::query(
                "CREATE TABLE machines (id TEXT PRIMARY KEY NOT NULL, app TEXT NOT NULL,
                 name TEXT NOT NULL, worker TEXT NOT NULL, last_json TEXT, UNIQUE (app, name))",
            )
            .execute(&old)
            .await
            .expect("old schema");
            sqlx::query(
                "INSERT INTO machines (id, app, name, worker) VALUES ('m1', 'a', 'one', 'w')",
            )
            .execute(&old)
            .await
            .expect("old row");
            old.close().await;
        }
        let store = ControlStore::open(&path).await.expect("migrated");
        let row = store.machine("a", "m1").await.expect("read").expect("row");
        assert_eq!((row.name.as_str(), row.size), ("one", None));
        let size = MachineSize {
            cpus: 2,
            memory_mb: 512,
        };
        store
            .set_machine_size("m1", Some(size))
            .await
            .expect("keep");
        let row = store.machine("a", "m1").await.expect("read").expect("row");
        assert_eq!(row.size, Some(size));
        let new = MachineIndexRow {
            id: "m2".into(),
            app: "a".into(),
            name: "two".into(),
            worker: "w".into(),
            size: Some(size),
        };
        assert_eq!(
            store.insert_machine(&new).await.expect("insert"),
            Inserted::Yes
        );
        assert_eq!(store.machines("a").await.expect("list")[1], new);
        store.close().await;
        // Opening again finds the columns there and adds nothing.
        let store = ControlStore::open(&path).await.expect("reopened");
        assert_eq!(store.machines("a").await.expect("list").len(), 2);
        store.close().await;
    }
}
