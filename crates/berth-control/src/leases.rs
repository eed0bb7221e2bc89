//! Leases, with Fly's semantics: one holder at a time; while a lease is held every
//! mutating call on the Machine must carry its nonce in `berth-lease-nonce`. A lease ends
//! when released or when its TTL runs out (by the control plane's clock).

use axum::extract::{OptionalFromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use berth_api::{DestroyResponse, ErrorBody, Lease, LeaseRequest, LEASE_NONCE_HEADER};
use sqlx::Row;
use subtle::ConstantTimeEq;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{header_text, ApiPath, OptionalJson};
use crate::limits::Action;
use crate::{format_ms, ControlPlane, Shared};

pub(crate) const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS leases (
        machine_id TEXT PRIMARY KEY NOT NULL,
        nonce TEXT NOT NULL,
        owner TEXT NOT NULL,
        description TEXT NOT NULL,
        expires_at_ms INTEGER NOT NULL
    )"];

const DEFAULT_TTL_S: u64 = 30;
const MAX_TTL_S: u64 = 86_400;
const MAX_DESCRIPTION: usize = 256;

pub(crate) struct LeaseRow {
    nonce: String,
    owner: String,
    description: String,
    expires_at_ms: i64,
}

impl LeaseRow {
    fn to_api(&self) -> Lease {
        Lease {
            nonce: self.nonce.clone(),
            expires_at: format_ms(self.expires_at_ms),
            owner: self.owner.clone(),
            description: self.description.clone(),
        }
    }
}

fn is_nonce(text: &str) -> bool {
    text.len() == 32
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The nonce a caller sent in `berth-lease-nonce`, of the right shape. Taken as
/// `Option<LeaseNonce>`; one of the wrong shape is refused with `invalid_lease_nonce`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseNonce(String);

impl LeaseNonce {
    fn parse(text: &str) -> Result<LeaseNonce, ApiError> {
        if !is_nonce(text) {
            let mut error = ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_lease_nonce",
                "a lease nonce is 32 lower-case hex digits, as POST .../lease returned it",
            );
            error.body.field = Some(LEASE_NONCE_HEADER.into());
            return Err(error);
        }
        Ok(LeaseNonce(text.to_owned()))
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for LeaseNonce {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<LeaseNonce>, ApiError> {
        header_text(&parts.headers, LEASE_NONCE_HEADER, "invalid_lease_nonce")?
            .map(LeaseNonce::parse)
            .transpose()
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
        "SELECT nonce, owner, description, expires_at_ms FROM leases WHERE machine_id = ? AND expires_at_ms > ?",
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
    sqlx::query("DELETE FROM leases WHERE machine_id = ?")
        .bind(machine)
        .execute(control.store.pool())
        .await?;
    Ok(())
}

/// Takes the lease, or refreshes it when the caller sends the current nonce.
#[utoipa::path(post, path = "/apps/{app}/machines/{id}/lease", tag = "leases",
    params(("app" = String, Path), ("id" = String, Path),
           ("berth-lease-nonce" = Option<String>, Header, description = "refresh the lease with this nonce")),
    request_body(content = Option<LeaseRequest>),
    responses((status = 201, description = "a new lease", body = Lease),
              (status = 200, description = "the lease, refreshed", body = Lease),
              (status = 409, description = "somebody else holds it", body = ErrorBody),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn acquire_lease(
    State(control): State<Shared>,
    principal: Principal,
    given: Option<LeaseNonce>,
    ApiPath((app, id)): ApiPath<(String, String)>,
    OptionalJson(request): OptionalJson<LeaseRequest>,
) -> Result<(StatusCode, Json<Lease>), ApiError> {
    control
        .acquire_lease(&principal, given.as_ref(), &app, &id, request)
        .await
}

#[utoipa::path(get, path = "/apps/{app}/machines/{id}/lease", tag = "leases",
    params(("app" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Lease), (status = "default", body = ErrorBody)))]
pub(crate) async fn get_lease(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<Lease>, ApiError> {
    control.get_lease(&principal, &app, &id).await
}

#[utoipa::path(delete, path = "/apps/{app}/machines/{id}/lease", tag = "leases",
    params(("app" = String, Path), ("id" = String, Path),
           ("berth-lease-nonce" = String, Header, description = "the nonce of the lease to release")),
    responses((status = 200, body = DestroyResponse), (status = "default", body = ErrorBody)))]
pub(crate) async fn release_lease(
    State(control): State<Shared>,
    principal: Principal,
    given: Option<LeaseNonce>,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<DestroyResponse>, ApiError> {
    control
        .release_lease(&principal, given.as_ref(), &app, &id)
        .await
}

impl ControlPlane {
    /// Takes a Machine's lease (201), or refreshes it (200) when `given` is its nonce.
    pub(crate) async fn acquire_lease(
        &self,
        principal: &Principal,
        given: Option<&LeaseNonce>,
        app: &str,
        id: &str,
        request: LeaseRequest,
    ) -> Result<(StatusCode, Json<Lease>), ApiError> {
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
                "UPDATE leases SET expires_at_ms = ?, description = COALESCE(?, description)
                 WHERE machine_id = ? AND nonce = ? AND expires_at_ms > ?",
            )
            .bind(expires)
            .bind(&request.description)
            .bind(id)
            .bind(&nonce.0)
            .bind(now)
            .execute(pool)
            .await?;
            if refreshed.rows_affected() == 1 {
                let lease = current(self, id)
                    .await?
                    .ok_or_else(|| ApiError::not_found("lease"))?;
                return Ok((StatusCode::OK, Json(lease.to_api())));
            }
        }
        let lease = LeaseRow {
            nonce: hex::encode(rand::random::<[u8; 16]>()),
            owner: principal.owner(),
            description: request.description.unwrap_or_default(),
            expires_at_ms: expires,
        };
        // One statement, so two callers racing for a free lease cannot both win.
        let taken = sqlx::query(
            "INSERT INTO leases (machine_id, nonce, owner, description, expires_at_ms) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (machine_id) DO UPDATE SET nonce = excluded.nonce, owner = excluded.owner,
               description = excluded.description, expires_at_ms = excluded.expires_at_ms
             WHERE leases.expires_at_ms <= ?",
        )
        .bind(id)
        .bind(&lease.nonce)
        .bind(&lease.owner)
        .bind(&lease.description)
        .bind(lease.expires_at_ms)
        .bind(now)
        .execute(pool)
        .await?;
        if taken.rows_affected() == 1 {
            return Ok((StatusCode::CREATED, Json(lease.to_api())));
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
    ) -> Result<Json<Lease>, ApiError> {
        self.check_rate(principal, Action::Read, None).await?;
        self.machine(principal, app, id).await?;
        current(self, id)
            .await?
            .map(|lease| Json(lease.to_api()))
            .ok_or_else(|| ApiError::not_found(format!("lease on machine {id}")))
    }

    /// Ends a Machine's lease; only its holder, by nonce, may.
    pub(crate) async fn release_lease(
        &self,
        principal: &Principal,
        given: Option<&LeaseNonce>,
        app: &str,
        id: &str,
    ) -> Result<Json<DestroyResponse>, ApiError> {
        self.machine(principal, app, id).await?;
        self.check_rate(principal, Action::Update, Some(id)).await?;
        let now = self.clock.now_ms();
        let held = current(self, id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("lease on machine {id}")))?;
        if !same_nonce(given, &held.nonce) {
            return Err(lease_held(&held, now));
        }
        sqlx::query("DELETE FROM leases WHERE machine_id = ? AND nonce = ?")
            .bind(id)
            .bind(&held.nonce)
            .execute(self.store.pool())
            .await?;
        Ok(Json(DestroyResponse { ok: true }))
    }
}
