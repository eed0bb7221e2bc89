//! Leases, with Fly's semantics and wire shapes: one holder at a time; while a lease is
//! held every mutating call on the Machine must carry its nonce in
//! `fly-machine-lease-nonce` (or Berth's earlier `berth-lease-nonce`). A lease ends when
//! released or when its TTL runs out (by the control plane's clock).

use axum::extract::{OptionalFromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use berth_api::{
    ErrorBody, Lease, LeaseReleased, LeaseRequest, LeaseResponse, ReleaseLeaseResponse,
    BERTH_LEASE_NONCE_HEADER, LEASE_NONCE_HEADER, LEASE_STATUS_SUCCESS,
};
use serde::Deserialize;
use sqlx::Row;
use subtle::ConstantTimeEq;
use utoipa::IntoParams;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{header_text, ApiPath, ApiQuery, OptionalJson};
use crate::limits::Action;
use crate::{format_ms, ControlPlane, Shared};

pub(crate) const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS leases (
        machine_id TEXT PRIMARY KEY NOT NULL,
        nonce TEXT NOT NULL,
        owner TEXT NOT NULL,
        description TEXT NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        version TEXT NOT NULL DEFAULT ''
    )"];

const DEFAULT_TTL_S: u64 = 30;
pub(crate) const MAX_TTL_S: u64 = 86_400;
const MAX_DESCRIPTION: usize = 256;

pub(crate) struct LeaseRow {
    nonce: String,
    owner: String,
    description: String,
    expires_at_ms: i64,
    version: String,
}

impl LeaseRow {
    /// Fly's envelope, with Berth's earlier fields beside it for one release.
    fn to_api(&self) -> LeaseResponse {
        LeaseResponse {
            status: LEASE_STATUS_SUCCESS.into(),
            data: Lease {
                nonce: self.nonce.clone(),
                expires_at: self.expires_at_ms.div_euclid(1000),
                owner: self.owner.clone(),
                description: self.description.clone(),
                version: self.version.clone(),
            },
            nonce: Some(self.nonce.clone()),
            expires_at: Some(format_ms(self.expires_at_ms)),
            owner: Some(self.owner.clone()),
            description: Some(self.description.clone()),
        }
    }
}

/// A fresh lease version: it changes on every take and refresh.
fn new_version() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

fn is_nonce(text: &str) -> bool {
    text.len() == 32
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The nonce a caller sent in `fly-machine-lease-nonce` or `berth-lease-nonce`, of the
/// right shape. Taken as `Option<LeaseNonce>`; one of the wrong shape, or two different
/// ones, is refused with `invalid_lease_nonce`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseNonce(String);

impl LeaseNonce {
    fn parse(header: &str, text: &str) -> Result<LeaseNonce, ApiError> {
        if !is_nonce(text) {
            let mut error = ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_lease_nonce",
                "a lease nonce is 32 lower-case hex digits, as POST .../lease returned it",
            );
            error.body.field = Some(header.into());
            return Err(error);
        }
        Ok(LeaseNonce(text.to_owned()))
    }

    /// Reads Fly's header and Berth's earlier one; both may come if they agree.
    fn from_headers(headers: &axum::http::HeaderMap) -> Result<Option<LeaseNonce>, ApiError> {
        let fly = header_text(headers, LEASE_NONCE_HEADER, "invalid_lease_nonce")?
            .map(|text| LeaseNonce::parse(LEASE_NONCE_HEADER, text))
            .transpose()?;
        let berth = header_text(headers, BERTH_LEASE_NONCE_HEADER, "invalid_lease_nonce")?
            .map(|text| LeaseNonce::parse(BERTH_LEASE_NONCE_HEADER, text))
            .transpose()?;
        match (fly, berth) {
            (Some(fly), Some(berth)) if fly != berth => {
                let mut error = ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_lease_nonce",
                    format!(
                        "{LEASE_NONCE_HEADER} and {BERTH_LEASE_NONCE_HEADER} name different nonces; send one"
                    ),
                );
                error.body.field = Some(BERTH_LEASE_NONCE_HEADER.into());
                Err(error)
            }
            (fly, berth) => Ok(fly.or(berth)),
        }
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for LeaseNonce {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<LeaseNonce>, ApiError> {
        LeaseNonce::from_headers(&parts.headers)
    }
}

fn same_nonce(given: Option<&LeaseNonce>, held: &str) -> bool {
    given.is_some_and(|given| bool::from(given.0.as_bytes().ct_eq(held.as_bytes())))
}

fn lease_held(lease: &LeaseRow, now_ms: i64) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::CONFLICT,
        "lease_held",
        format!(
            "the machine is leased by {} until {}; send the lease's nonce in {LEASE_NONCE_HEADER}",
            lease.owner,
            format_ms(lease.expires_at_ms)
        ),
    );
    error.body.retry_after_ms = Some(
        u64::try_from(lease.expires_at_ms - now_ms)
            .unwrap_or(0)
            .max(1),
    );
    error
}

/// The lease held on a Machine now, if any.
pub(crate) async fn current(
    control: &ControlPlane,
    machine: &str,
) -> Result<Option<LeaseRow>, ApiError> {
    let row = sqlx::query(
        "SELECT nonce, owner, description, expires_at_ms, version FROM leases WHERE machine_id = $1 AND expires_at_ms > $2",
    )
    .bind(machine)
    .bind(control.clock.now_ms())
    .fetch_optional(control.store.pool())
    .await?;
    Ok(row.map(|row| LeaseRow {
        nonce: row.get(0),
        owner: row.get(1),
        description: row.get(2),
        expires_at_ms: row.get(3),
        version: row.get(4),
    }))
}

/// Lets a mutating call through unless somebody else holds the Machine's lease.
pub(crate) async fn check(
    control: &ControlPlane,
    machine: &str,
    given: Option<&LeaseNonce>,
) -> Result<(), ApiError> {
    let lease = current(control, machine).await;
    check_against(control, lease, given)
}

/// [`check`] against a lease already looked up (with [`current`]).
pub(crate) fn check_against(
    control: &ControlPlane,
    lease: Result<Option<LeaseRow>, ApiError>,
    given: Option<&LeaseNonce>,
) -> Result<(), ApiError> {
    match lease? {
        Some(lease) if !same_nonce(given, &lease.nonce) => {
            Err(lease_held(&lease, control.clock.now_ms()))
        }
        _ => Ok(()),
    }
}

pub(crate) async fn forget(control: &ControlPlane, machine: &str) -> Result<(), ApiError> {
    sqlx::query("DELETE FROM leases WHERE machine_id = $1")
        .bind(machine)
        .execute(control.store.pool())
        .await?;
    Ok(())
}

/// `?ttl=` on acquire, as fly-go sends it.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct LeaseQuery {
    /// Seconds the lease lasts (as the body's `ttl`; if both come they must agree).
    ttl: Option<u64>,
}

/// Takes the lease, or refreshes it when the caller sends the current nonce.
#[utoipa::path(post, path = "/apps/{app}/machines/{id}/lease", tag = "leases",
    params(("app" = String, Path), ("id" = String, Path), LeaseQuery,
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "refresh the lease with this nonce"),
           ("berth-lease-nonce" = Option<String>, Header, deprecated, description = "the same as fly-machine-lease-nonce (Berth's earlier name, kept for one release)")),
    request_body(content = Option<LeaseRequest>),
    responses((status = 200, description = "the lease, taken or (with its nonce) refreshed", body = LeaseResponse),
              (status = 409, description = "somebody else holds it", body = ErrorBody),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn acquire_lease(
    State(control): State<Shared>,
    principal: Principal,
    given: Option<LeaseNonce>,
    ApiPath((app, id)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<LeaseQuery>,
    OptionalJson(request): OptionalJson<LeaseRequest>,
) -> Result<Json<LeaseResponse>, ApiError> {
    let request = with_query_ttl(request, query)?;
    control
        .acquire_lease(&principal, given.as_ref(), &app, &id, request)
        .await
}

/// The body's TTL, or the query's; both may come if they agree.
fn with_query_ttl(mut request: LeaseRequest, query: LeaseQuery) -> Result<LeaseRequest, ApiError> {
    match (request.ttl, query.ttl) {
        (Some(body), Some(query)) if body != query => Err(ApiError::invalid_config(
            "ttl",
            format!("the body says {body} seconds and ?ttl= says {query}; send one"),
        )),
        (None, query) => {
            request.ttl = query;
            Ok(request)
        }
        _ => Ok(request),
    }
}

#[utoipa::path(get, path = "/apps/{app}/machines/{id}/lease", tag = "leases",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = LeaseResponse),
              (status = 404, description = "no lease is held", body = ErrorBody),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn get_lease(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<LeaseResponse>, ApiError> {
    control.get_lease(&principal, &app, &id).await
}

#[utoipa::path(delete, path = "/apps/{app}/machines/{id}/lease", tag = "leases",
    params(("app" = String, Path), ("id" = String, Path),
           ("fly-machine-lease-nonce" = Option<String>, Header, description = "the nonce of the lease to release"),
           ("berth-lease-nonce" = Option<String>, Header, deprecated, description = "the same as fly-machine-lease-nonce (Berth's earlier name, kept for one release)")),
    responses((status = 200, body = ReleaseLeaseResponse),
              (status = 404, description = "no lease is held", body = ErrorBody),
              (status = 409, description = "the nonce is not the lease's", body = ErrorBody),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn release_lease(
    State(control): State<Shared>,
    principal: Principal,
    given: Option<LeaseNonce>,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<ReleaseLeaseResponse>, ApiError> {
    control
        .release_lease(&principal, given.as_ref(), &app, &id)
        .await
}

/// Checks a create's `lease_ttl` before anything is made.
pub(crate) fn check_create_ttl(ttl: Option<u64>) -> Result<(), ApiError> {
    match ttl {
        Some(ttl) if !(1..=MAX_TTL_S).contains(&ttl) => Err(ApiError::invalid_config(
            "lease_ttl",
            format!("must be 1 to {MAX_TTL_S} seconds"),
        )),
        _ => Ok(()),
    }
}

/// Gives the creator of a new Machine its lease for `ttl_s` seconds (create's
/// `lease_ttl`) and answers the nonce. Nobody else can hold a lease on an id this new;
/// a left-over row of the id (a keyed create retried) is replaced.
pub(crate) async fn grant_on_create(
    control: &ControlPlane,
    principal: &Principal,
    id: &str,
    ttl_s: u64,
) -> Result<String, ApiError> {
    let now = control.clock.now_ms();
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    sqlx::query(
        "INSERT INTO leases (machine_id, nonce, owner, description, expires_at_ms, version)
         VALUES ($1, $2, $3, '', $4, $5)
         ON CONFLICT (machine_id) DO UPDATE SET nonce = excluded.nonce, owner = excluded.owner,
         description = excluded.description, expires_at_ms = excluded.expires_at_ms,
         version = excluded.version",
    )
    .bind(id)
    .bind(&nonce)
    .bind(principal.owner())
    .bind(now.saturating_add(i64::try_from(ttl_s.saturating_mul(1000)).unwrap_or(i64::MAX)))
    .bind(new_version())
    .execute(control.store.pool())
    .await?;
    Ok(nonce)
}

impl ControlPlane {
    /// Takes a Machine's lease, or refreshes it when `given` is its nonce (200 either way,
    /// as Fly answers; a refresh keeps the nonce).
    pub(crate) async fn acquire_lease(
        &self,
        principal: &Principal,
        given: Option<&LeaseNonce>,
        app: &str,
        id: &str,
        request: LeaseRequest,
    ) -> Result<Json<LeaseResponse>, ApiError> {
        self.machine(principal, app, id).await?;
        self.check_rate(principal, Action::Update, Some(id)).await?;
        let ttl = request.ttl.unwrap_or(DEFAULT_TTL_S);
        if !(1..=MAX_TTL_S).contains(&ttl) {
            return Err(ApiError::invalid_config(
                "ttl",
                format!("must be 1 to {MAX_TTL_S} seconds"),
            ));
        }
        if request
            .description
            .as_ref()
            .is_some_and(|text| text.len() > MAX_DESCRIPTION || text.contains('\0'))
        {
            return Err(ApiError::invalid_config(
                "description",
                format!("at most {MAX_DESCRIPTION} bytes, without NUL"),
            ));
        }
        let now = self.clock.now_ms();
        let expires = now.saturating_add(i64::try_from(ttl * 1000).unwrap_or(i64::MAX));
        let pool = self.store.pool();
        if let Some(nonce) = given {
            let refreshed = sqlx::query(
                "UPDATE leases SET expires_at_ms = $1, description = COALESCE($2, description), version = $3
                 WHERE machine_id = $4 AND nonce = $5 AND expires_at_ms > $6",
            )
            .bind(expires)
            .bind(&request.description)
            .bind(new_version())
            .bind(id)
            .bind(&nonce.0)
            .bind(now)
            .execute(pool)
            .await?;
            if refreshed.rows_affected() == 1 {
                let lease = current(self, id)
                    .await?
                    .ok_or_else(|| ApiError::not_found("lease"))?;
                return Ok(Json(lease.to_api()));
            }
        }
        let lease = LeaseRow {
            nonce: hex::encode(rand::random::<[u8; 16]>()),
            owner: principal.owner(),
            description: request.description.unwrap_or_default(),
            expires_at_ms: expires,
            version: new_version(),
        };
        // One statement, so two callers racing for a free lease cannot both win.
        let taken = sqlx::query(
            "INSERT INTO leases (machine_id, nonce, owner, description, expires_at_ms, version) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (machine_id) DO UPDATE SET nonce = excluded.nonce, owner = excluded.owner,
               description = excluded.description, expires_at_ms = excluded.expires_at_ms,
               version = excluded.version
             WHERE leases.expires_at_ms <= $7",
        )
        .bind(id)
        .bind(&lease.nonce)
        .bind(&lease.owner)
        .bind(&lease.description)
        .bind(lease.expires_at_ms)
        .bind(&lease.version)
        .bind(now)
        .execute(pool)
        .await?;
        if taken.rows_affected() == 1 {
            return Ok(Json(lease.to_api()));
        }
        match current(self, id).await? {
            Some(held) => Err(lease_held(&held, now)),
            None => Err(ApiError::new(
                StatusCode::CONFLICT,
                "lease_held",
                "the lease changed hands just now; retry",
            )),
        }
    }

    /// The lease held on a Machine now.
    pub(crate) async fn get_lease(
        &self,
        principal: &Principal,
        app: &str,
        id: &str,
    ) -> Result<Json<LeaseResponse>, ApiError> {
        self.check_rate(principal, Action::Read, None).await?;
        self.machine(principal, app, id).await?;
        current(self, id)
            .await?
            .map(|lease| Json(lease.to_api()))
            .ok_or_else(|| ApiError::not_found(format!("lease on machine {id}")))
    }

    /// Ends a Machine's lease; only its holder, by nonce, may. As Fly: no lease held (or
    /// one that ran out) is 404, another's nonce is 409.
    pub(crate) async fn release_lease(
        &self,
        principal: &Principal,
        given: Option<&LeaseNonce>,
        app: &str,
        id: &str,
    ) -> Result<Json<ReleaseLeaseResponse>, ApiError> {
        self.machine(principal, app, id).await?;
        self.check_rate(principal, Action::Update, Some(id)).await?;
        let now = self.clock.now_ms();
        let held = current(self, id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("lease on machine {id}")))?;
        if !same_nonce(given, &held.nonce) {
            return Err(lease_held(&held, now));
        }
        sqlx::query("DELETE FROM leases WHERE machine_id = $1 AND nonce = $2")
            .bind(id)
            .bind(&held.nonce)
            .execute(self.store.pool())
            .await?;
        Ok(Json(ReleaseLeaseResponse {
            status: LEASE_STATUS_SUCCESS.into(),
            data: LeaseReleased { ok: true },
            ok: true,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn leases_from_before_versions_gain_the_column_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.db");
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .expect("pool");
        sqlx::query(
            "CREATE TABLE leases (machine_id TEXT PRIMARY KEY NOT NULL, nonce TEXT NOT NULL,
             owner TEXT NOT NULL, description TEXT NOT NULL, expires_at_ms INTEGER NOT NULL)",
        )
        .execute(&pool)
        .await
        .expect("old schema");
        sqlx::query("INSERT INTO leases VALUES ('m1', 'n', 'o', '', 5)")
            .execute(&pool)
            .await
            .expect("old row");
        pool.close().await;
        let store = crate::store::ControlStore::open(&path)
            .await
            .expect("migrated");
        store.close().await;
        let store = crate::store::ControlStore::open(&path)
            .await
            .expect("a second time changes nothing");
        let version: String = sqlx::query_scalar("SELECT version FROM leases")
            .fetch_one(store.pool())
            .await
            .expect("version");
        assert_eq!(version, "");
    }

    #[test]
    fn the_query_ttl_fills_in_for_the_body_and_must_agree_with_it() {
        let body = |ttl| LeaseRequest {
            ttl,
            description: None,
        };
        let query = |ttl| LeaseQuery { ttl };
        let merged = |b, q| with_query_ttl(body(b), query(q)).map(|request| request.ttl);
        assert_eq!(merged(None, Some(9)).ok(), Some(Some(9)));
        assert_eq!(merged(Some(9), None).ok(), Some(Some(9)));
        assert_eq!(merged(Some(9), Some(9)).ok(), Some(Some(9)));
        assert_eq!(merged(None, None).ok(), Some(None));
        let error = merged(Some(9), Some(8)).expect_err("disagree");
        assert_eq!(error.body.field.as_deref(), Some("ttl"));
    }
}
