//! `Idempotency-Key` on create, start, stop and destroy: a retry with the same key within
//! 24 hours gets the first answer again, from SQLite, and does nothing twice. The same key
//! with a different request is refused. Only final answers are remembered: errors that
//! say to retry (a retry hint, 429, 5xx) free the key for the next attempt.
//!
//! Replicas share the keys: a claim records the replica running its call, and another
//! replica takes an unfinished claim over only once that replica is no longer live.

use std::future::Future;

use axum::body::Body;
use axum::extract::OptionalFromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{AnyPool, Row};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::header_text;
use crate::replicas::{self, Replicas};
use crate::ControlPlane;

pub(crate) const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS idempotency (
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        fingerprint BLOB NOT NULL,
        status INTEGER,
        body BLOB,
        created_at_ms INTEGER NOT NULL,
        replica TEXT,
        PRIMARY KEY (scope, key)
    )",
    "CREATE INDEX IF NOT EXISTS idempotency_by_age ON idempotency(created_at_ms)",
];

const KEEP_MS: i64 = 24 * 60 * 60 * 1000;
const MAX_KEY_LEN: usize = 255;
/// The largest answer remembered; Machine JSON is a few KiB.
const MAX_REMEMBERED: usize = 4 * 1024 * 1024;
/// Set on an answer that is a replay of the first one.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

enum Begin {
    Proceed(Option<Claim>),
    Replay(Response),
}

/// A key taken for a call in flight. If the call never finishes (the client went
/// away), the key is freed so a retry can run.
struct Claim {
    pool: AnyPool,
    scope: String,
    key: String,
    /// The replica running the call: it alone finishes or frees the claim.
    replica: String,
    /// When the key was first claimed; kept when a claim is taken over after a restart.
    claimed_at_ms: i64,
    done: bool,
}

/// `status` of a claim whose call died with an earlier control plane process: the next
/// call with the key takes it over.
const ABANDONED: i64 = -1;

impl Claim {
    /// The id a keyed create gives its Machine: the same on every retry of the key, so a
    /// retry after the control plane died mid-create finds the Machine it began instead
    /// of making a second one.
    fn machine_id(&self) -> String {
        let digest = Sha256::digest(
            format!("{}|{}|{}", self.scope, self.key, self.claimed_at_ms).as_bytes(),
        );
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&digest[..8]);
        format!("{:014x}", u64::from_be_bytes(bytes) & 0x00ff_ffff_ffff_ffff)
    }
}

/// Marks every claim whose call never finished as abandoned. Called when a SQLite control
/// plane opens: it is the file's one process, so no call of an earlier one still runs,
/// and its claims would otherwise answer `idempotency_key_in_use` until its replica row
/// ages out. The next call with the key takes the claim over, with its first claim time,
/// so a keyed create keeps its Machine id. Replicas on PostgreSQL do not call it: another
/// live replica's calls are in flight; a dead replica's claims are taken over lazily.
pub(crate) async fn abandon_unfinished(pool: &AnyPool) -> Result<u64, sqlx::Error> {
    let abandoned = sqlx::query("UPDATE idempotency SET status = $1 WHERE status IS NULL")
        .bind(ABANDONED)
        .execute(pool)
        .await?;
    Ok(abandoned.rows_affected())
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let pool = self.pool.clone();
        let scope = std::mem::take(&mut self.scope);
        let key = std::mem::take(&mut self.key);
        let replica = std::mem::take(&mut self.replica);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // Only while it is still this replica's: another may have taken it over.
                let _ = sqlx::query(
                    "DELETE FROM idempotency WHERE scope = $1 AND key = $2 AND replica = $3",
                )
                .bind(scope)
                .bind(key)
                .bind(replica)
                .execute(&pool)
                .await;
            });
        }
    }
}

fn bad_key(message: &str) -> ApiError {
    let mut error = ApiError::new(StatusCode::BAD_REQUEST, "invalid_idempotency_key", message);
    error.body.field = Some("Idempotency-Key".into());
    error
}

/// The caller's `Idempotency-Key`: 1 to 255 visible characters. Taken as
/// `Option<IdempotencyKey>`; a malformed one is refused with `invalid_idempotency_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdempotencyKey(String);

impl<S: Send + Sync> OptionalFromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        _: &S,
    ) -> Result<Option<IdempotencyKey>, ApiError> {
        let Some(key) = header_text(
            &parts.headers,
            berth_api::IDEMPOTENCY_KEY_HEADER,
            "invalid_idempotency_key",
        )?
        else {
            return Ok(None);
        };
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(bad_key("an Idempotency-Key is 1 to 255 visible characters"));
        }
        Ok(Some(IdempotencyKey(key.to_owned())))
    }
}

/// Runs `call` with `request` once per key: a retry with the same key and request gets
/// the first answer, and a call without a key just runs. `call` also gets the Machine id
/// a keyed create must use.
pub(crate) async fn once<Request, Call, Answer>(
    control: &ControlPlane,
    principal: &Principal,
    key: Option<&IdempotencyKey>,
    operation: &str,
    request: Request,
    call: Call,
) -> Response
where
    Request: Serialize,
    Call: FnOnce(Request, Option<String>) -> Answer,
    Answer: Future<Output = Response>,
{
    let claim = match begin(control, principal, key, operation, &request).await {
        Ok(Begin::Replay(response)) => return response,
        Ok(Begin::Proceed(claim)) => claim,
        Err(error) => return error.into_response(),
    };
    let machine_id = claim.as_ref().map(Claim::machine_id);
    finish(claim, call(request, machine_id).await).await
}

/// Takes the request's key for `operation`, or answers with what the first call got.
async fn begin(
    control: &ControlPlane,
    principal: &Principal,
    key: Option<&IdempotencyKey>,
    operation: &str,
    request: &impl Serialize,
) -> Result<Begin, ApiError> {
    let Some(IdempotencyKey(key)) = key else {
        return Ok(Begin::Proceed(None));
    };
    let key = key.as_str();
    let pool = control.store.pool();
    let scope = format!("{}|{operation}", principal.scope());
    let fingerprint: Vec<u8> =
        Sha256::digest(serde_json::to_vec(request).map_err(ApiError::internal)?).to_vec();
    let now = control.clock.now_ms();
    sqlx::query("DELETE FROM idempotency WHERE created_at_ms < $1")
        .bind(now - KEEP_MS)
        .execute(pool)
        .await?;
    let replica = control.replicas.id();
    let inserted = sqlx::query(
        "INSERT INTO idempotency (scope, key, fingerprint, created_at_ms, replica)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (scope, key) DO NOTHING",
    )
    .bind(&scope)
    .bind(key)
    .bind(&fingerprint)
    .bind(now)
    .bind(replica)
    .execute(pool)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(Begin::Proceed(Some(Claim {
            pool: pool.clone(),
            scope,
            key: key.to_owned(),
            replica: replica.to_owned(),
            claimed_at_ms: now,
            done: false,
        })));
    }
    let row = sqlx::query(
        "SELECT fingerprint, status, body, created_at_ms FROM idempotency WHERE scope = $1 AND key = $2",
    )
    .bind(&scope)
    .bind(key)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        // Freed between the two statements: the caller's retry will take it.
        return Err(in_use());
    };
    let stored: Vec<u8> = row.get(0);
    if stored != fingerprint {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different request in the last 24 hours",
        ));
    }
    let status: Option<i64> = row.get(1);
    if status.is_none() || status == Some(ABANDONED) {
        // Freed by its call, or still claimed: taken over only when the replica that
        // claimed it is gone, in one statement, so two replicas cannot both take it.
        let taken = sqlx::query(&format!(
            "UPDATE idempotency SET status = NULL, replica = $1
             WHERE scope = $2 AND key = $3
             AND (status = $4 OR (status IS NULL AND {}))",
            replicas::not_live("replica", 5)
        ))
        .bind(replica)
        .bind(&scope)
        .bind(key)
        .bind(ABANDONED)
        .bind(Replicas::cutoff())
        .execute(pool)
        .await?;
        if taken.rows_affected() != 1 {
            return Err(in_use());
        }
        return Ok(Begin::Proceed(Some(Claim {
            pool: pool.clone(),
            scope,
            key: key.to_owned(),
            replica: replica.to_owned(),
            claimed_at_ms: row.get(3),
            done: false,
        })));
    }
    let Some(status) = status else {
        return Err(in_use());
    };
    let body: Vec<u8> = row.get::<Option<Vec<u8>>, _>(2).unwrap_or_default();
    let status = u16::try_from(status)
        .ok()
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    Ok(Begin::Replay(response))
}

fn in_use() -> ApiError {
    let mut error = ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_key_in_use",
        "a call with this Idempotency-Key is still running; retry shortly",
    );
    error.body.retry_after_ms = Some(1000);
    error
}

/// Remembers the answer under the claimed key, or frees the key (keeping its claim time)
/// when the answer says to retry.
async fn finish(claim: Option<Claim>, response: Response) -> Response {
    let Some(mut claim) = claim else {
        return response;
    };
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_REMEMBERED).await else {
        return ApiError::internal("the answer was too large to remember").into_response();
    };
    let status = parts.status;
    let is_final = !status.is_server_error()
        && status != StatusCode::TOO_MANY_REQUESTS
        && !parts.headers.contains_key(header::RETRY_AFTER);
    // Recorded only while the claim is still this replica's: one taken for dead (a
    // replica cut off from the database for longer than `LIVE_MS`) has a new owner, whose
    // answer stands.
    let result = if is_final {
        sqlx::query(
            "UPDATE idempotency SET status = $1, body = $2
             WHERE scope = $3 AND key = $4 AND replica = $5",
        )
        .bind(i64::from(status.as_u16()))
        .bind(bytes.to_vec())
        .bind(&claim.scope)
        .bind(&claim.key)
        .bind(&claim.replica)
        .execute(&claim.pool)
        .await
    } else {
        // Freed for the retry, which takes it over with the same claim time: a keyed
        // create derives its Machine id from it, and the first attempt may have made that
        // Machine before the error (a worker that answered late, a restart in between).
        sqlx::query(
            "UPDATE idempotency SET status = $1 WHERE scope = $2 AND key = $3 AND replica = $4",
        )
        .bind(ABANDONED)
        .bind(&claim.scope)
        .bind(&claim.key)
        .bind(&claim.replica)
        .execute(&claim.pool)
        .await
    };
    if let Err(error) = result {
        tracing::warn!(%error, "remembering an idempotent answer");
    } else {
        claim.done = true;
    }
    Response::from_parts(parts, Body::from(bytes))
}
