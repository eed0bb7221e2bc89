//! Usage metering on the control plane: ingestion of every worker's usage journal into a
//! ledger, exactly once, and `GET /v1/orgs/{org}/usage`.
//!
//! Delivery is a pull: for each worker the control plane keeps the last sequence number it
//! ingested (the acknowledgement) and asks for what follows. A batch goes into the ledger
//! in one transaction, keyed by `(worker, seq)`, together with the new cursor; a repeated
//! or replayed batch inserts nothing, and the intervals are derived only from rows that
//! were new. Killing either side at any moment loses and doubles nothing.
//!
//! Replicas on one PostgreSQL take turns: a pass over a worker's journal holds an advisory
//! lock keyed by the worker for its transaction, and a replica that finds it held skips
//! that worker this round. The key and the cursor would make a second pass harmless; the
//! lock saves the duplicate pull, and a replica that dies mid-pass loses its transaction
//! and its lock together. A usage report does not skip: it waits (bounded) for the other
//! pass to end and then pulls itself, so it misses nothing journaled before it was asked.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_api::{UsageKind, UsageRecord, UsageReport, UsageRow};
use berth_core::billing::{split_by_day, IntervalKind, Prices, Quantities, Window, DAY_MS};
use berth_core::ids;
use berth_worker::WorkerService;
use serde::Deserialize;
use sqlx::{Any, AnyPool, Row, Transaction};
use tracing::warn;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::limits::Action;
use crate::store::{Backend, ControlStore};
use crate::{format_ms, now_ms, ControlPlane, Shared};

/// How often the control plane pulls each worker's journal.
const INGEST_INTERVAL: Duration = Duration::from_secs(2);
const INGEST_BATCH: u32 = 1000;

pub(crate) const SCHEMA: &[&str] = &[
    // Who owned a Machine or a volume, kept after it and its app are gone: usage outlives
    // both.
    "CREATE TABLE IF NOT EXISTS machine_owners (
        machine_id TEXT PRIMARY KEY NOT NULL,
        app TEXT NOT NULL,
        org TEXT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS usage_ledger (
        worker TEXT NOT NULL,
        seq INTEGER NOT NULL,
        machine_id TEXT NOT NULL,
        app TEXT NOT NULL,
        kind TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        cpus INTEGER NOT NULL,
        memory_mb INTEGER NOT NULL,
        storage_bytes INTEGER NOT NULL,
        basis TEXT,
        PRIMARY KEY (worker, seq)
    )",
    "CREATE TABLE IF NOT EXISTS usage_cursor (worker TEXT PRIMARY KEY NOT NULL, last_seq INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS usage_intervals (
        id INTEGER PRIMARY KEY,
        org TEXT NOT NULL,
        app TEXT NOT NULL,
        machine_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        start_ms INTEGER NOT NULL,
        end_ms INTEGER,
        cpus INTEGER NOT NULL,
        memory_mb INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        worker TEXT NOT NULL DEFAULT ''
    )",
    "CREATE INDEX IF NOT EXISTS intervals_by_org ON usage_intervals(org, start_ms)",
    "CREATE INDEX IF NOT EXISTS open_intervals ON usage_intervals(machine_id, kind) WHERE end_ms IS NULL",
];

pub async fn record_owner(
    pool: &AnyPool,
    machine_id: &str,
    app: &str,
    org: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO machine_owners (machine_id, app, org) VALUES ($1, $2, $3)
         ON CONFLICT (machine_id) DO UPDATE SET app = excluded.app, org = excluded.org",
    )
    .bind(machine_id)
    .bind(app)
    .bind(org)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn cursor(pool: &AnyPool, worker: &str) -> Result<u64, sqlx::Error> {
    let row = sqlx::query("SELECT last_seq FROM usage_cursor WHERE worker = $1")
        .bind(worker)
        .fetch_optional(pool)
        .await?;
    Ok(row
        .map(|row| u64::try_from(row.get::<i64, _>(0)).unwrap_or_default())
        .unwrap_or(0))
}

fn kind_text(kind: UsageKind) -> &'static str {
    match kind {
        UsageKind::Created => "created",
        UsageKind::RunStart => "run_start",
        UsageKind::RunStop => "run_stop",
        UsageKind::Storage => "storage",
        UsageKind::Destroyed => "destroyed",
        UsageKind::MigratedOut => "migrated_out",
        UsageKind::CheckpointStorage => "checkpoint_storage",
    }
}

/// Ingests one batch from `worker` atomically. Returns how many records were new.
pub async fn ingest(
    pool: &AnyPool,
    worker: &str,
    batch: &[UsageRecord],
) -> Result<usize, sqlx::Error> {
    if batch.is_empty() {
        return Ok(0);
    }
    let mut transaction = pool.begin().await?;
    let new = ingest_in(&mut transaction, worker, batch).await?;
    transaction.commit().await?;
    Ok(new)
}

/// The advisory lock class of usage passes; the worker's name hashed is the other key.
const INGEST_LOCK_CLASS: i32 = 0x6265_7573;

/// What one pass over a worker's journal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// This many records were pulled (and the new ones ingested).
    Pulled(usize),
    /// Another replica is ingesting this worker's journal; nothing was pulled.
    Busy,
}

/// How long a usage report waits, over all workers, for other replicas' passes to end: a
/// pass pulls one batch, normally over in milliseconds. Below the pool's statement timeout.
pub const REPORT_WAIT: Duration = Duration::from_millis(2000);

/// One pass over `worker`'s journal: reads the cursor, pulls what follows with `pull`,
/// and ingests it. On PostgreSQL the whole pass is one transaction holding an advisory
/// lock keyed by the worker, so one replica at a time pulls a given worker's journal and
/// another answers [`Pass::Busy`] without pulling. On SQLite the one process serializes
/// its passes itself.
pub async fn ingest_pass<Pull, Pulled>(
    store: &ControlStore,
    worker: &str,
    pull: Pull,
) -> Result<Pass, String>
where
    Pull: FnOnce(u64) -> Pulled,
    Pulled: std::future::Future<Output = Result<Vec<UsageRecord>, String>>,
{
    pass(store, worker, Duration::ZERO, pull).await
}

/// [`ingest_pass`], but when another replica's pass over the worker is running, waits up
/// to `wait` for it to end and then pulls; [`Pass::Busy`] only when it outlasts `wait`.
pub async fn ingest_pass_waiting<Pull, Pulled>(
    store: &ControlStore,
    worker: &str,
    wait: Duration,
    pull: Pull,
) -> Result<Pass, String>
where
    Pull: FnOnce(u64) -> Pulled,
    Pulled: std::future::Future<Output = Result<Vec<UsageRecord>, String>>,
{
    pass(store, worker, wait, pull).await
}

/// PostgreSQL's `lock_not_available`: `lock_timeout` passed while waiting for a lock.
fn lock_timed_out(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database) if database.code().as_deref() == Some("55P03"))
}

async fn pass<Pull, Pulled>(
    store: &ControlStore,
    worker: &str,
    wait: Duration,
    pull: Pull,
) -> Result<Pass, String>
where
    Pull: FnOnce(u64) -> Pulled,
    Pulled: std::future::Future<Output = Result<Vec<UsageRecord>, String>>,
{
    let text = |error: sqlx::Error| error.to_string();
    let pool = store.pool();
    if store.backend() == Backend::Sqlite {
        let batch = pull(cursor(pool, worker).await.map_err(text)?).await?;
        ingest(pool, worker, &batch).await.map_err(text)?;
        return Ok(Pass::Pulled(batch.len()));
    }
    let mut transaction = pool.begin().await.map_err(text)?;
    let wait_ms = wait.as_millis();
    let locked = if wait_ms == 0 {
        sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_xact_lock($1, hashtext($2))")
            .bind(INGEST_LOCK_CLASS)
            .bind(worker)
            .fetch_one(&mut *transaction)
            .await
            .map_err(text)?
    } else {
        // Bounded by the server, for the transaction only: a wait that runs out fails its
        // statement cleanly, where dropping a future mid-query would not.
        sqlx::query(&format!("SET LOCAL lock_timeout = {wait_ms}"))
            .execute(&mut *transaction)
            .await
            .map_err(text)?;
        let waited =
            sqlx::query("SELECT 1 FROM (SELECT pg_advisory_xact_lock($1, hashtext($2))) AS locked")
                .bind(INGEST_LOCK_CLASS)
                .bind(worker)
                .execute(&mut *transaction)
                .await;
        match waited {
            Ok(_) => true,
            Err(error) if lock_timed_out(&error) => false,
            Err(error) => return Err(text(error)),
        }
    };
    if !locked {
        return Ok(Pass::Busy);
    }
    let after = sqlx::query_scalar::<_, i64>("SELECT last_seq FROM usage_cursor WHERE worker = $1")
        .bind(worker)
        .fetch_optional(&mut *transaction)
        .await
        .map_err(text)?
        .map_or(0, |seq| u64::try_from(seq).unwrap_or_default());
    let batch = pull(after).await?;
    ingest_in(&mut transaction, worker, &batch)
        .await
        .map_err(text)?;
    transaction.commit().await.map_err(text)?;
    Ok(Pass::Pulled(batch.len()))
}

/// [`ingest`] inside the caller's transaction.
async fn ingest_in(
    transaction: &mut Transaction<'_, Any>,
    worker: &str,
    batch: &[UsageRecord],
) -> Result<usize, sqlx::Error> {
    let Some(last) = batch.iter().map(|record| record.seq).max() else {
        return Ok(0);
    };
    let mut new = 0;
    for record in batch {
        let inserted = sqlx::query(
            "INSERT INTO usage_ledger
             (worker, seq, machine_id, app, kind, at_ms, cpus, memory_mb, storage_bytes, basis)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (worker, seq) DO NOTHING",
        )
        .bind(worker)
        .bind(i64::try_from(record.seq).unwrap_or(i64::MAX))
        .bind(&record.machine_id)
        .bind(&record.app)
        .bind(kind_text(record.kind))
        .bind(record.at_ms)
        .bind(i64::from(record.cpus))
        .bind(i64::from(record.memory_mb))
        .bind(i64::try_from(record.storage_bytes).unwrap_or(i64::MAX))
        .bind(record.basis.map(|basis| {
            serde_json::to_value(basis)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
        }))
        .execute(&mut **transaction)
        .await?
        .rows_affected();
        if inserted == 1 {
            apply(transaction, worker, record).await?;
            new += 1;
        }
    }
    sqlx::query(
        "INSERT INTO usage_cursor (worker, last_seq) VALUES ($1, $2)
         ON CONFLICT(worker) DO UPDATE SET last_seq =
             CASE WHEN excluded.last_seq > usage_cursor.last_seq THEN excluded.last_seq ELSE usage_cursor.last_seq END",
    )
    .bind(worker)
    .bind(i64::try_from(last).unwrap_or(i64::MAX))
    .execute(&mut **transaction)
    .await?;
    Ok(new)
}

/// The interval bookkeeping of `berth_core::billing::Meter`, in SQL.
async fn apply(
    transaction: &mut Transaction<'_, Any>,
    worker: &str,
    record: &UsageRecord,
) -> Result<(), sqlx::Error> {
    let org: Option<String> = sqlx::query("SELECT org FROM machine_owners WHERE machine_id = $1")
        .bind(&record.machine_id)
        .fetch_optional(&mut **transaction)
        .await?
        .map(|row| row.get(0));
    let org = org.unwrap_or_default();
    let close = |kind: &'static str| {
        sqlx::query(
            "UPDATE usage_intervals SET end_ms = CASE WHEN start_ms > $1 THEN start_ms ELSE $1 END
             WHERE machine_id = $2 AND kind = $3 AND worker IN ($4, '') AND end_ms IS NULL",
        )
        .bind(record.at_ms)
        .bind(record.machine_id.clone())
        .bind(kind)
        .bind(worker.to_owned())
    };
    let open = |kind: &'static str| {
        sqlx::query(
            "INSERT INTO usage_intervals (org, app, machine_id, kind, start_ms, end_ms, cpus, memory_mb, bytes, worker)
             VALUES ($1, $2, $3, $4, $5, NULL, $6, $7, $8, $9)",
        )
        .bind(org.clone())
        .bind(record.app.clone())
        .bind(record.machine_id.clone())
        .bind(kind)
        .bind(record.at_ms)
        .bind(i64::from(record.cpus))
        .bind(i64::from(record.memory_mb))
        .bind(i64::try_from(record.storage_bytes).unwrap_or(i64::MAX))
        .bind(worker.to_owned())
    };
    match record.kind {
        UsageKind::Created | UsageKind::Storage => {
            close("storage").execute(&mut **transaction).await?;
            open("storage").execute(&mut **transaction).await?;
        }
        UsageKind::RunStart => {
            close("run").execute(&mut **transaction).await?;
            open("run").execute(&mut **transaction).await?;
        }
        UsageKind::RunStop => {
            close("run").execute(&mut **transaction).await?;
        }
        UsageKind::CheckpointStorage => {
            close("checkpoint_storage")
                .execute(&mut **transaction)
                .await?;
            open("checkpoint_storage")
                .execute(&mut **transaction)
                .await?;
        }
        UsageKind::Destroyed | UsageKind::MigratedOut => {
            close("run").execute(&mut **transaction).await?;
            close("storage").execute(&mut **transaction).await?;
            close("checkpoint_storage")
                .execute(&mut **transaction)
                .await?;
        }
    }
    Ok(())
}

/// A stored interval, as the billing maths sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredInterval {
    pub app: String,
    pub machine_id: String,
    pub kind: IntervalKind,
    pub start_ms: i64,
    pub end_ms: Option<i64>,
}

/// Intervals of `org` that overlap the window. With `org = None`, every interval.
pub async fn intervals(
    pool: &AnyPool,
    org: Option<&str>,
    window: Window,
) -> Result<Vec<StoredInterval>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT app, machine_id, kind, start_ms, end_ms, cpus, memory_mb, bytes FROM usage_intervals
         WHERE (CAST($1 AS TEXT) IS NULL OR org = $1) AND start_ms < $2 AND (end_ms IS NULL OR end_ms > $3)",
    )
    .bind(org)
    .bind(window.to_ms)
    .bind(window.from_ms)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let bytes = u64::try_from(row.get::<i64, _>(7)).unwrap_or_default();
            let kind = match row.get::<String, _>(2).as_str() {
                "run" => IntervalKind::Run {
                    cpus: u32::try_from(row.get::<i64, _>(5)).unwrap_or_default(),
                    memory_mb: u32::try_from(row.get::<i64, _>(6)).unwrap_or_default(),
                },
                "checkpoint_storage" => IntervalKind::CheckpointStorage { bytes },
                _ => IntervalKind::Storage { bytes },
            };
            StoredInterval {
                app: row.get(0),
                machine_id: row.get(1),
                kind,
                start_ms: row.get(3),
                end_ms: row.get(4),
            }
        })
        .collect())
}

/// Pulls every worker's journal until it is drained. With `wait`, a worker that another
/// replica is ingesting is waited for, all of them within `wait` in total; answers the
/// workers still busy then (without `wait`, the ones skipped).
pub(crate) async fn ingest_all(control: &ControlPlane, wait: Duration) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + wait;
    let _one_at_a_time = control.ingest_lock.lock().await;
    let mut busy = Vec::new();
    for (name, worker) in control.workers.all() {
        loop {
            // At least a millisecond: zero would skip instead of waiting.
            let left = match wait.is_zero() {
                true => Duration::ZERO,
                false => deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .max(Duration::from_millis(1)),
            };
            match ingest_worker(control, &name, worker.as_ref(), left).await {
                Ok(Pass::Pulled(count)) if count == INGEST_BATCH as usize => continue,
                Ok(Pass::Pulled(_)) => break,
                Ok(Pass::Busy) => {
                    busy.push(name.clone());
                    break;
                }
                Err(error) => {
                    warn!(worker = %name, %error, "ingesting usage; will retry");
                    break;
                }
            }
        }
    }
    busy
}

async fn ingest_worker(
    control: &ControlPlane,
    name: &str,
    worker: &dyn WorkerService,
    wait: Duration,
) -> Result<Pass, String> {
    pass(&control.store, name, wait, |after| async move {
        worker
            .usage_since(after, INGEST_BATCH)
            .await
            .map_err(|error| error.to_string())
    })
    .await
}

pub(crate) fn spawn_ingestion(control: &std::sync::Arc<ControlPlane>) {
    let weak = std::sync::Arc::downgrade(control);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INGEST_INTERVAL);
        loop {
            tick.tick().await;
            let Some(control) = weak.upgrade() else {
                return;
            };
            // Skips a worker another replica is ingesting: the next round comes soon.
            ingest_all(&control, Duration::ZERO).await;
        }
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Machine,
    App,
    Day,
}

/// The same sums as [`report_rows`] for `machine` and `app`, computed by SQLite, so a
/// query over a million journal records moves a row per group, not per interval.
pub async fn aggregate(
    pool: &AnyPool,
    org: &str,
    window: Window,
    now_ms: i64,
    group_by: GroupBy,
) -> Result<BTreeMap<String, Quantities>, sqlx::Error> {
    let key = match group_by {
        GroupBy::App => "app",
        GroupBy::Machine | GroupBy::Day => "machine_id",
    };
    // The clipped span of each interval: MIN(end or now, to) - MAX(start, from), in CASEs
    // that read the same on SQLite and PostgreSQL; sums cast back to BIGINT, which
    // PostgreSQL would widen to NUMERIC.
    let query = format!(
        "SELECT {key}, kind,
                CAST(SUM(span) AS BIGINT),
                CAST(SUM(span * cpus) AS BIGINT),
                CAST(SUM(span * memory_mb) AS BIGINT),
                CAST(COALESCE(SUM(span * CAST(bytes AS DOUBLE PRECISION)), 0) AS DOUBLE PRECISION)
         FROM (
             SELECT {key}, kind, cpus, memory_mb, bytes,
                    (CASE WHEN COALESCE(end_ms, $1) < $2 THEN COALESCE(end_ms, $1) ELSE $2 END)
                    - (CASE WHEN start_ms > $3 THEN start_ms ELSE $3 END) AS span
             FROM usage_intervals
             WHERE org = $4 AND start_ms < $2 AND COALESCE(end_ms, $1) > $3
         ) AS clipped
         WHERE span > 0
         GROUP BY {key}, kind"
    );
    let rows = sqlx::query(&query)
        .bind(now_ms)
        .bind(window.to_ms)
        .bind(window.from_ms)
        .bind(org)
        .fetch_all(pool)
        .await?;
    let mut groups: BTreeMap<String, Quantities> = BTreeMap::new();
    for row in rows {
        let entry = groups.entry(row.get::<String, _>(0)).or_default();
        match row.get::<String, _>(1).as_str() {
            "run" => {
                entry.running_ms += row.get::<i64, _>(2);
                entry.cpu_ms += i128::from(row.get::<i64, _>(3));
                entry.memory_mib_ms += i128::from(row.get::<i64, _>(4));
            }
            "checkpoint_storage" => entry.checkpoint_byte_ms += row.get::<f64, _>(5) as i128,
            _ => entry.storage_byte_ms += row.get::<f64, _>(5) as i128,
        }
    }
    Ok(groups)
}

/// Sums the intervals inside the window, grouped; rows sorted by their key.
pub fn report_rows(
    intervals: &[StoredInterval],
    window: Window,
    now_ms: i64,
    group_by: GroupBy,
) -> BTreeMap<String, Quantities> {
    let mut groups: BTreeMap<String, Quantities> = BTreeMap::new();
    for interval in intervals {
        let Some((start, end)) = window.clip(interval.start_ms, interval.end_ms, now_ms) else {
            continue;
        };
        match group_by {
            GroupBy::Machine => groups
                .entry(interval.machine_id.clone())
                .or_default()
                .add_span(interval.kind, start, end),
            GroupBy::App => {
                groups
                    .entry(interval.app.clone())
                    .or_default()
                    .add_span(interval.kind, start, end)
            }
            GroupBy::Day => {
                for (day, piece_start, piece_end) in split_by_day(start, end) {
                    let label = format_ms(day * DAY_MS)
                        .get(..10)
                        .unwrap_or_default()
                        .to_owned();
                    groups.entry(label).or_default().add_span(
                        interval.kind,
                        piece_start,
                        piece_end,
                    );
                }
            }
        }
    }
    groups
}

fn row(group_by: Option<GroupBy>, key: &str, quantities: &Quantities, prices: &Prices) -> UsageRow {
    let round = |value: f64| (value * 1e6).round() / 1e6;
    // Per machine, a volume's entries are keyed by its own id.
    let volume = ids::has_id_shape(key, "vol_");
    UsageRow {
        machine: (group_by == Some(GroupBy::Machine) && !volume).then(|| key.to_owned()),
        volume: (group_by == Some(GroupBy::Machine) && volume).then(|| key.to_owned()),
        app: (group_by == Some(GroupBy::App)).then(|| key.to_owned()),
        day: (group_by == Some(GroupBy::Day)).then(|| key.to_owned()),
        running_seconds: round(quantities.running_seconds()),
        cpu_seconds: round(quantities.cpu_seconds()),
        memory_gb_seconds: round(quantities.memory_gb_seconds()),
        storage_gb_hours: round(quantities.storage_gb_hours()),
        checkpoint_storage_gb_hours: round(quantities.checkpoint_storage_gb_hours()),
        cost: round(prices.cost(quantities)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
}

/// RFC 3339, a plain date (UTC midnight) or milliseconds since the epoch.
fn parse_time(field: &str, text: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let parsed = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .or_else(|_| {
            let format = time::macros::format_description!("[year]-[month]-[day]");
            time::Date::parse(text, &format).map(|date| date.midnight().assume_utc())
        });
    parsed
        .map(|moment| i64::try_from(moment.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
        .map_err(|_| {
            ApiError::invalid_config(
                field,
                format!("{field} must be RFC 3339, YYYY-MM-DD or epoch milliseconds"),
            )
        })
}

#[utoipa::path(get, path = "/orgs/{org}/usage", tag = "usage",
    params(("org" = String, Path), ("from" = Option<String>, Query), ("to" = Option<String>, Query),
        ("group_by" = Option<String>, Query, description = "machine, app or day")),
    responses((status = 200, body = UsageReport, description = "JSON, or CSV with Accept: text/csv"),
        (status = "default", body = berth_api::ErrorBody)))]
pub(crate) async fn org_usage(
    State(control): State<Shared>,
    principal: Principal,
    UrlPath(org): UrlPath<String>,
    headers: HeaderMap,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query
        .map(|Query(query)| query)
        .map_err(|rejection| ApiError::invalid_config("query", rejection.body_text()));
    let report = control.org_usage(&principal, org, query).await?;
    Ok(report_response(&headers, report))
}

/// The report as CSV when the caller accepts `text/csv`, as JSON otherwise.
fn report_response(headers: &HeaderMap, report: UsageReport) -> Response {
    let wants_csv = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.contains("text/csv"));
    if wants_csv {
        return (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            to_csv(&report),
        )
            .into_response();
    }
    (StatusCode::OK, Json(report)).into_response()
}

impl ControlPlane {
    /// An org's usage over a window, grouped, priced, after ingesting what the workers
    /// have recorded since the last pass.
    pub(crate) async fn org_usage(
        &self,
        principal: &Principal,
        org: String,
        query: Result<UsageQuery, ApiError>,
    ) -> Result<UsageReport, ApiError> {
        self.check_rate(principal, Action::Read, None).await?;
        // A malformed query is refused after the rate check.
        let query = query?;
        // Another org's usage answers exactly like an org that does not exist.
        if !principal.can_see(&org) || !self.store.org_exists(&org).await? {
            return Err(ApiError::not_found(format!("org {org:?}")));
        }
        let now = now_ms();
        let to_ms = query
            .to
            .as_deref()
            .map(|text| parse_time("to", text))
            .transpose()?
            .unwrap_or(now);
        let from_ms = match query.from.as_deref() {
            Some(text) => parse_time("from", text)?,
            None => to_ms - 30 * DAY_MS,
        };
        if from_ms >= to_ms {
            return Err(ApiError::invalid_config("from", "from must be before to"));
        }
        let group_by = match query.group_by.as_deref().unwrap_or("machine") {
            "machine" => GroupBy::Machine,
            "app" => GroupBy::App,
            "day" => GroupBy::Day,
            _ => {
                return Err(ApiError::invalid_config(
                    "group_by",
                    "group_by is machine, app or day",
                ))
            }
        };
        // Everything journaled before this request is in the ledger before it is summed.
        let busy = ingest_all(self, REPORT_WAIT).await;
        if !busy.is_empty() {
            let mut error = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "usage_busy",
                format!(
                    "another replica is still ingesting the usage of worker(s) {}; ask again",
                    busy.join(", ")
                ),
            );
            error.body.retry_after_ms = Some(1000);
            return Err(error);
        }
        let window = Window { from_ms, to_ms };
        let groups = match group_by {
            // Summed in SQL: no interval leaves the database.
            GroupBy::Machine | GroupBy::App => {
                aggregate(self.store.pool(), &org, window, now, group_by).await?
            }
            GroupBy::Day => {
                let intervals = intervals(self.store.pool(), Some(&org), window).await?;
                report_rows(&intervals, window, now, group_by)
            }
        };
        let mut total = Quantities::default();
        groups
            .values()
            .for_each(|quantities| total.merge(quantities));
        let prices = self.prices;
        let report = UsageReport {
            org,
            from: format_ms(from_ms),
            to: format_ms(to_ms),
            group_by: query.group_by.unwrap_or_else(|| "machine".into()),
            rows: groups
                .iter()
                .map(|(key, quantities)| row(Some(group_by), key, quantities, &prices))
                .collect(),
            total: row(None, "", &total, &prices),
        };
        Ok(report)
    }
}

/// The CSV keeps the columns clients already read (its `cost` includes checkpoints);
/// checkpoint storage as a column of its own is in the JSON answer.
fn to_csv(report: &UsageReport) -> String {
    let mut out = format!(
        "{},running_seconds,cpu_seconds,memory_gb_seconds,storage_gb_hours,cost\n",
        report.group_by
    );
    for row in &report.rows {
        let key = row
            .machine
            .as_deref()
            .or(row.volume.as_deref())
            .or(row.app.as_deref())
            .or(row.day.as_deref())
            .unwrap_or_default();
        out.push_str(&format!(
            "{key},{},{},{},{},{}\n",
            row.running_seconds,
            row.cpu_seconds,
            row.memory_gb_seconds,
            row.storage_gb_hours,
            row.cost
        ));
    }
    out
}
