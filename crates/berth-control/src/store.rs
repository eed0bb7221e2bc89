//! The control plane's store: orgs, apps, and the index of which worker holds each Machine.
//! The workers hold the Machines' full records.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

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

fn volume_row(row: &AnyRow) -> VolumeIndexRow {
    VolumeIndexRow {
        id: row.get(0),
        app: row.get(1),
        worker: row.get(2),
        size_gb: u32::try_from(row.get::<i64, _>(3)).unwrap_or(u32::MAX),
    }
}

fn org_row(row: AnyRow) -> OrgRow {
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
fn index_row(row: &AnyRow) -> MachineIndexRow {
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

/// Which database the control plane keeps its state in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// One SQLite file: the default, and what `berth up` uses.
    Sqlite(PathBuf),
    /// A PostgreSQL database, which several control planes may share.
    Postgres(String),
}

/// The two backends, for the few places where SQL cannot be the same on both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Database {
    /// The default: `control.db` in the data dir.
    pub fn in_data_dir(data_dir: &Path) -> Database {
        Database::Sqlite(data_dir.join("control.db"))
    }

    /// `sqlite://PATH`, `postgres://…` or `postgresql://…`.
    pub fn parse(url: &str) -> Result<Database, String> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            let path = path.split_once('?').map_or(path, |(path, _)| path);
            if path.is_empty() {
                return Err(format!(
                    "{url:?} names no file: use sqlite:///path/to/control.db"
                ));
            }
            return Ok(Database::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Database::Postgres(url.to_owned()));
        }
        let scheme = url.split_once("://").map_or(url, |(scheme, _)| scheme);
        Err(format!(
            "unknown database {scheme:?}: use sqlite://PATH or postgres://USER@HOST/DB"
        ))
    }

    pub fn backend(&self) -> Backend {
        match self {
            Database::Sqlite(_) => Backend::Sqlite,
            Database::Postgres(_) => Backend::Postgres,
        }
    }
}

impl FromStr for Database {
    type Err = String;

    fn from_str(url: &str) -> Result<Database, String> {
        Database::parse(url)
    }
}

/// How the URL appears in logs: without a password.
impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            Database::Postgres(url) => match url.split_once("://").zip(url.rsplit_once('@')) {
                Some(((scheme, _), (_, host))) => write!(f, "{scheme}://…@{host}"),
                None => f.write_str(url),
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct ControlStore {
    pool: AnyPool,
    backend: Backend,
    _checkpointer: Option<std::sync::Arc<tokio_util::task::AbortOnDropHandle<()>>>,
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

/// How long a request waits for a PostgreSQL connection (connecting included) before it
/// is answered `store_unavailable`.
pub const ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// PostgreSQL cancels a statement that runs longer (a lock held by a stuck peer, say).
const STATEMENT_TIMEOUT_MS: u32 = 2500;
/// The migrations of a PostgreSQL database; sqlx's migrator holds an advisory lock while
/// it applies them, so replicas starting together apply each once.
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Checkpoints the WAL from a background task, so that SQLite's automatic checkpoint,
/// with its fsyncs, does not run inside a request's commit (a start, say). The task ends
/// when the handle drops.
fn checkpoint_in_background(pool: AnyPool) -> tokio_util::task::AbortOnDropHandle<()> {
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

/// The SQLite schema; a file from an older release gains its missing columns in
/// [`upgrade_sqlite`]. PostgreSQL's is `migrations/postgres`, with the same tables.
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
        running INTEGER NOT NULL DEFAULT 0,
        state_event INTEGER,
        claim_ms INTEGER,
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
        size_gb INTEGER NOT NULL DEFAULT 0,
        last_json TEXT
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

/// The names of `table`'s columns in a SQLite file.
pub(crate) async fn sqlite_columns(
    pool: &AnyPool,
    table: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT name FROM pragma_table_info($1)")
        .bind(table)
        .fetch_all(pool)
        .await
}

/// Adds `column` to a SQLite `table` made before it existed.
async fn add_sqlite_column(
    pool: &AnyPool,
    table: &str,
    column: &str,
    definition: &str,
) -> Result<(), sqlx::Error> {
    if !sqlite_columns(pool, table)
        .await?
        .iter()
        .any(|name| name == column)
    {
        sqlx::query(&format!(
            "ALTER TABLE {table} ADD COLUMN {column} {definition}"
        ))
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Creates what is missing in a SQLite file and adds the columns that files from older
/// releases lack.
pub(crate) async fn upgrade_sqlite(pool: &AnyPool) -> Result<(), sqlx::Error> {
    let statements = SCHEMA
        .iter()
        .chain(crate::auth::SCHEMA)
        .chain(crate::limits::SCHEMA)
        .chain(crate::leases::SCHEMA)
        .chain(crate::idempotency::SCHEMA)
        .chain(crate::migrate::SCHEMA)
        .chain(crate::usage::SCHEMA)
        .chain(crate::workers::SCHEMA)
        .chain(crate::replicas::SCHEMA)
        .chain(crate::drain::SCHEMA)
        .chain(crate::shared_images::SCHEMA)
        .chain(crate::standbys::SCHEMA);
    for statement in statements {
        sqlx::query(statement).execute(pool).await?;
    }
    // Machines indexed before sizes were kept: start fills them from the worker.
    add_sqlite_column(pool, "machines", "cpus", "INTEGER").await?;
    add_sqlite_column(pool, "machines", "memory_mb", "INTEGER").await?;
    // Shared start quotas' columns (PostgreSQL uses them; SQLite keeps the same schema).
    add_sqlite_column(pool, "machines", "running", "INTEGER NOT NULL DEFAULT 0").await?;
    add_sqlite_column(pool, "machines", "state_event", "INTEGER").await?;
    add_sqlite_column(pool, "machines", "claim_ms", "INTEGER").await?;
    for (column, definition) in crate::workers::ADDED_COLUMNS {
        add_sqlite_column(pool, "workers", column, definition).await?;
    }
    // Orgs from before names are named by slug.
    add_sqlite_column(pool, "orgs", "name", "TEXT").await?;
    add_sqlite_column(pool, "volumes", "size_gb", "INTEGER NOT NULL DEFAULT 0").await?;
    add_sqlite_column(pool, "volumes", "last_json", "TEXT").await?;
    // Leases from before versions (a day at most) answer an empty version until refreshed.
    add_sqlite_column(pool, "leases", "version", "TEXT NOT NULL DEFAULT ''").await?;
    // Claims and moves record the replica running them; older rows have none.
    add_sqlite_column(pool, "idempotency", "replica", "TEXT").await?;
    add_sqlite_column(pool, "migrations", "replica", "TEXT").await?;
    // Intervals are kept per worker since Machines can move: a file from before has every
    // interval on its Machine's one worker, which `''` stands for.
    add_sqlite_column(
        pool,
        "usage_intervals",
        "worker",
        "TEXT NOT NULL DEFAULT ''",
    )
    .await?;
    Ok(())
}

/// Registers sqlx's drivers for [`AnyPool`], once per process.
pub fn install_drivers() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(sqlx::any::install_default_drivers);
}

/// The pool of a SQLite file, with the pragmas the control plane has always used.
async fn sqlite_pool(path: &Path) -> Result<AnyPool, sqlx::Error> {
    // `mode=rwc` creates the file if it is missing.
    let url = format!("sqlite://{}?mode=rwc", path.display());
    AnyPoolOptions::new()
        .max_connections(4)
        .after_connect(|connection, _| {
            Box::pin(async move {
                // WAL with synchronous=NORMAL: a commit is durable at the next checkpoint,
                // which runs in the background, not inside a request's commit.
                for pragma in [
                    "PRAGMA journal_mode = WAL".to_owned(),
                    "PRAGMA synchronous = NORMAL".to_owned(),
                    "PRAGMA foreign_keys = ON".to_owned(),
                    format!("PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}"),
                    "PRAGMA busy_timeout = 10000".to_owned(),
                ] {
                    sqlx::query(&pragma).execute(&mut *connection).await?;
                }
                Ok(())
            })
        })
        // A write that failed on a full disk can leave its connection inside a
        // transaction, holding a read snapshot that every later write on it fails against
        // (SQLITE_BUSY_SNAPSHOT) long after the disk has room again. Nothing may be open
        // on a connection back in the pool, so whatever is gets rolled back; on a clean
        // connection the ROLLBACK is refused at once, and that refusal is expected.
        .after_release(|connection, _| {
            Box::pin(async move {
                let _ = sqlx::query("ROLLBACK").execute(&mut *connection).await;
                Ok(true)
            })
        })
        .connect(&url)
        .await
}

/// The pool of a PostgreSQL database, bounded so that a database that is down answers
/// within [`ACQUIRE_TIMEOUT`] instead of holding requests.
async fn postgres_pool(url: &str) -> Result<AnyPool, sqlx::Error> {
    AnyPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        // No ping before each query: it would add a round trip to every request. A broken
        // connection fails its query (503) and sqlx's check on release drops it.
        .test_before_acquire(false)
        .after_connect(|connection, _| {
            Box::pin(async move {
                sqlx::query(&format!("SET statement_timeout = {STATEMENT_TIMEOUT_MS}"))
                    .execute(&mut *connection)
                    .await?;
                Ok(())
            })
        })
        .connect(url)
        .await
}

impl ControlStore {
    /// The SQLite file at `path`, made if missing.
    pub async fn open(path: &Path) -> Result<ControlStore, sqlx::Error> {
        ControlStore::connect(&Database::Sqlite(path.to_owned())).await
    }

    /// Connects to `database` and brings its schema up to date.
    pub async fn connect(database: &Database) -> Result<ControlStore, sqlx::Error> {
        install_drivers();
        match database {
            Database::Sqlite(path) => {
                let pool = sqlite_pool(path).await?;
                upgrade_sqlite(&pool).await?;
                let checkpointer = checkpoint_in_background(pool.clone());
                Ok(ControlStore {
                    pool,
                    backend: Backend::Sqlite,
                    _checkpointer: Some(std::sync::Arc::new(checkpointer)),
                })
            }
            Database::Postgres(url) => {
                // On a connection of its own, without the pool's statement timeout: a
                // replica may wait on the migrator's lock while another one migrates.
                let mut migrating = <sqlx::AnyConnection as sqlx::Connection>::connect(url).await?;
                POSTGRES_MIGRATIONS.run(&mut migrating).await?;
                sqlx::Connection::close(migrating).await?;
                let pool = postgres_pool(url).await?;
                Ok(ControlStore {
                    pool,
                    backend: Backend::Postgres,
                    _checkpointer: None,
                })
            }
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn ensure_org(&self, slug: &str, now_ms: i64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO orgs (slug, created_at_ms) VALUES ($1, $2) ON CONFLICT (slug) DO NOTHING",
        )
        .bind(slug)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn org_exists(&self, slug: &str) -> Result<bool, sqlx::Error> {
        let row = sqlx::query("SELECT 1 FROM orgs WHERE slug = $1")
            .bind(slug)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    pub async fn insert_app(&self, app: &AppRow) -> Result<Inserted, sqlx::Error> {
        let result = sqlx::query(
            "INSERT INTO apps (id, name, org_slug, created_at_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(&app.id)
        .bind(&app.name)
        .bind(&app.org_slug)
        .bind(app.created_at_ms)
        .execute(&self.pool)
        .await;
        unique(result)
    }

    pub async fn app(&self, name: &str) -> Result<Option<AppRow>, sqlx::Error> {
        let row = sqlx::query("SELECT id, name, org_slug, created_at_ms FROM apps WHERE name = $1")
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
        sqlx::query("DELETE FROM apps WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        self.forget_destroyed_machines(name).await
    }

    pub async fn insert_machine(&self, row: &MachineIndexRow) -> Result<Inserted, sqlx::Error> {
        unique(insert_machine_query(row).execute(&self.pool).await)
    }

    /// [`ControlStore::insert_machine`] inside `transaction`.
    pub(crate) async fn insert_machine_in(
        transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
        row: &MachineIndexRow,
    ) -> Result<Inserted, sqlx::Error> {
        unique(insert_machine_query(row).execute(&mut **transaction).await)
    }

    /// Keeps the Machine's size as its worker now has it; `None` when that is unknown.
    pub async fn set_machine_size(
        &self,
        id: &str,
        size: Option<MachineSize>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE machines SET cpus = $1, memory_mb = $2 WHERE id = $3")
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
            "SELECT id, app, name, worker, cpus, memory_mb FROM machines WHERE app = $1 AND id = $2",
        )
        .bind(app)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(index_row))
    }

    pub async fn machines(&self, app: &str) -> Result<Vec<MachineIndexRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, app, name, worker, cpus, memory_mb FROM machines WHERE app = $1 ORDER BY id",
        )
        .bind(app)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(index_row).collect())
    }

    /// Every Machine the index places on `worker`.
    pub async fn machines_on(&self, worker: &str) -> Result<Vec<MachineIndexRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, app, name, worker, cpus, memory_mb FROM machines WHERE worker = $1 ORDER BY id",
        )
        .bind(worker)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(index_row).collect())
    }

    /// The Machine JSON last answered by its worker.
    pub async fn remember_machine(&self, id: &str, json: &str) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE machines SET last_json = $1 WHERE id = $2")
            .bind(json)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn last_known_machine(&self, id: &str) -> Result<Option<String>, sqlx::Error> {
        let row = sqlx::query("SELECT last_json FROM machines WHERE id = $1")
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
        sqlx::query("DELETE FROM machines WHERE id = $1")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        sqlx::query(
            "INSERT INTO destroyed_machines (id, app, json, destroyed_at_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET app = excluded.app, json = excluded.json,
             destroyed_at_ms = excluded.destroyed_at_ms",
        )
        .bind(id)
        .bind(app)
        .bind(json)
        .bind(now_ms)
        .execute(&mut *transaction)
        .await?;
        sqlx::query("DELETE FROM destroyed_machines WHERE destroyed_at_ms < $1")
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
            "SELECT json FROM destroyed_machines WHERE app = $1 AND destroyed_at_ms >= $2
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
        sqlx::query("DELETE FROM destroyed_machines WHERE app = $1")
            .bind(app)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn delete_machine(&self, id: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM machines WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn orgs(&self) -> Result<Vec<OrgRow>, sqlx::Error> {
        let rows = sqlx::query("SELECT slug, name, created_at_ms FROM orgs ORDER BY slug")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(org_row).collect())
    }

    pub async fn org(&self, slug: &str) -> Result<Option<OrgRow>, sqlx::Error> {
        let row = sqlx::query("SELECT slug, name, created_at_ms FROM orgs WHERE slug = $1")
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
        let result =
            sqlx::query("INSERT INTO orgs (slug, name, created_at_ms) VALUES ($1, $2, $3)")
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
            "SELECT COUNT(*) FROM machines JOIN apps ON machines.app = apps.name WHERE apps.org_slug = $1",
        )
        .bind(org)
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(row.get::<i64, _>(0)).unwrap_or(0))
    }

    pub async fn insert_volume(&self, row: &VolumeIndexRow) -> Result<(), sqlx::Error> {
        ControlStore::insert_volume_on(&self.pool, row).await
    }

    /// [`ControlStore::insert_volume`] on `executor` (a connection or transaction).
    pub(crate) async fn insert_volume_on<'e>(
        executor: impl sqlx::Executor<'e, Database = sqlx::Any>,
        row: &VolumeIndexRow,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO volumes (id, app, worker, size_gb) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET app = excluded.app, worker = excluded.worker,
             size_gb = excluded.size_gb",
        )
        .bind(&row.id)
        .bind(&row.app)
        .bind(&row.worker)
        .bind(i64::from(row.size_gb))
        .execute(executor)
        .await?;
        Ok(())
    }

    /// Keeps the volume's JSON as its create or update answered it: name and flags, for
    /// making it again if its worker is lost.
    pub async fn remember_volume(&self, id: &str, json: &str) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE volumes SET last_json = $1 WHERE id = $2")
            .bind(json)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn volume_last_json(&self, id: &str) -> Result<Option<String>, sqlx::Error> {
        let row = sqlx::query("SELECT last_json FROM volumes WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.and_then(|row| row.get::<Option<String>, _>(0)))
    }

    pub async fn set_volume_size(&self, id: &str, size_gb: u32) -> Result<(), sqlx::Error> {
        ControlStore::set_volume_size_on(&self.pool, id, size_gb).await
    }

    /// [`ControlStore::set_volume_size`] on `executor`.
    pub(crate) async fn set_volume_size_on<'e>(
        executor: impl sqlx::Executor<'e, Database = sqlx::Any>,
        id: &str,
        size_gb: u32,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE volumes SET size_gb = $1 WHERE id = $2")
            .bind(i64::from(size_gb))
            .bind(id)
            .execute(executor)
            .await?;
        Ok(())
    }

    /// Records a size the worker answered with; sizes only grow, so a late answer of an
    /// earlier extend never shrinks a later one.
    pub async fn grow_volume_size(&self, id: &str, size_gb: u32) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE volumes SET size_gb = CASE WHEN size_gb > $1 THEN size_gb ELSE $1 END WHERE id = $2")
            .bind(i64::from(size_gb))
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
        sqlx::query("UPDATE volumes SET size_gb = $1 WHERE id = $2 AND size_gb = $3")
            .bind(i64::from(old_gb))
            .bind(id)
            .bind(i64::from(reserved_gb))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// How many volumes the org's apps have, and their provisioned GB summed.
    pub async fn org_volume_totals(&self, org: &str) -> Result<(u64, u64), sqlx::Error> {
        ControlStore::org_volume_totals_on(&self.pool, org).await
    }

    /// [`ControlStore::org_volume_totals`] on `executor`.
    pub(crate) async fn org_volume_totals_on<'e>(
        executor: impl sqlx::Executor<'e, Database = sqlx::Any>,
        org: &str,
    ) -> Result<(u64, u64), sqlx::Error> {
        let row = sqlx::query(
            "SELECT COUNT(*), CAST(COALESCE(SUM(volumes.size_gb), 0) AS BIGINT) FROM volumes
             JOIN apps ON volumes.app = apps.name WHERE apps.org_slug = $1",
        )
        .bind(org)
        .fetch_one(executor)
        .await?;
        Ok((
            u64::try_from(row.get::<i64, _>(0)).unwrap_or(0),
            u64::try_from(row.get::<i64, _>(1)).unwrap_or(0),
        ))
    }

    pub async fn volume(&self, app: &str, id: &str) -> Result<Option<VolumeIndexRow>, sqlx::Error> {
        ControlStore::volume_on(&self.pool, app, id).await
    }

    /// [`ControlStore::volume`] on `executor`.
    pub(crate) async fn volume_on<'e>(
        executor: impl sqlx::Executor<'e, Database = sqlx::Any>,
        app: &str,
        id: &str,
    ) -> Result<Option<VolumeIndexRow>, sqlx::Error> {
        let row =
            sqlx::query("SELECT id, app, worker, size_gb FROM volumes WHERE app = $1 AND id = $2")
                .bind(app)
                .bind(id)
                .fetch_optional(executor)
                .await?;
        Ok(row.as_ref().map(volume_row))
    }

    pub async fn volumes(&self, app: &str) -> Result<Vec<VolumeIndexRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, app, worker, size_gb FROM volumes WHERE app = $1 ORDER BY rowid",
        )
        .bind(app)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(volume_row).collect())
    }

    /// Forgets the volume and its snapshots.
    pub async fn delete_volume(&self, id: &str) -> Result<(), sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        sqlx::query("DELETE FROM volume_snapshots WHERE volume_id = $1")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        sqlx::query("DELETE FROM volumes WHERE id = $1")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await
    }

    /// Moves the index rows of these volumes and of their snapshots to `worker`: part of
    /// a move's cutover transaction, so volume calls follow the Machine at once.
    pub async fn move_volumes(
        connection: &mut sqlx::AnyConnection,
        ids: &[String],
        worker: &str,
    ) -> Result<(), sqlx::Error> {
        for id in ids {
            sqlx::query("UPDATE volumes SET worker = $1 WHERE id = $2")
                .bind(worker)
                .bind(id)
                .execute(&mut *connection)
                .await?;
            sqlx::query("UPDATE volume_snapshots SET worker = $1 WHERE volume_id = $2")
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
            "INSERT INTO volume_snapshots (id, volume_id, worker) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET volume_id = excluded.volume_id, worker = excluded.worker",
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
             WHERE s.id = $1 AND v.app = $2",
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

fn insert_machine_query(
    row: &MachineIndexRow,
) -> sqlx::query::Query<'_, sqlx::Any, sqlx::any::AnyArguments<'_>> {
    sqlx::query(
        "INSERT INTO machines (id, app, name, worker, cpus, memory_mb) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&row.id)
    .bind(&row.app)
    .bind(&row.name)
    .bind(&row.worker)
    .bind(row.size.map(|size| i64::from(size.cpus)))
    .bind(row.size.map(|size| i64::from(size.memory_mb)))
}

fn unique(result: Result<sqlx::any::AnyQueryResult, sqlx::Error>) -> Result<Inserted, sqlx::Error> {
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
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

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
