//! `/v1/orgs` and `/v1/tokens`: the admin makes orgs, sets their limits and hands out
//! tokens; an org's token sees its own org and tokens, and nothing of any other.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use berth_api::{
    CreateOrgRequest, CreateTokenRequest, ErrorBody, Org, SetOrgLimitsRequest, TokenCreated,
    TokenInfo,
};
use berth_core::validate;
use serde::Deserialize;
use sqlx::{AnyPool, Row};
use utoipa::IntoParams;

use crate::auth::{self, Principal, TokenRow};
use crate::caches::Change;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::limits::{self, Action};
use crate::store::{Inserted, OrgRow};
use crate::{format_ms, ControlPlane, Shared};

pub(crate) async fn load_overrides(
    pool: &AnyPool,
) -> Result<HashMap<String, SetOrgLimitsRequest>, sqlx::Error> {
    let rows = sqlx::query("SELECT slug, overrides FROM org_limits")
        .fetch_all(pool)
        .await?;
    let mut map = HashMap::new();
    for row in rows {
        let text: String = row.get(1);
        match serde_json::from_str(&text) {
            Ok(overrides) => {
                map.insert(row.get(0), overrides);
            }
            Err(error) => tracing::warn!(%error, "unreadable org limits; using the defaults"),
        }
    }
    Ok(map)
}

async fn save_overrides(
    control: &ControlPlane,
    slug: &str,
    overrides: &SetOrgLimitsRequest,
) -> Result<(), ApiError> {
    let text = serde_json::to_string(overrides).map_err(ApiError::internal)?;
    sqlx::query(
        "INSERT INTO org_limits (slug, overrides) VALUES ($1, $2)
         ON CONFLICT (slug) DO UPDATE SET overrides = excluded.overrides",
    )
    .bind(slug)
    .bind(text)
    .execute(control.store.pool())
    .await?;
    if let Ok(mut map) = control.overrides.write() {
        map.insert(slug.to_owned(), *overrides);
    }
    control.announce(Change::Limits(slug)).await;
    Ok(())
}

async fn org_json(control: &ControlPlane, org: OrgRow) -> Result<Org, ApiError> {
    let OrgRow {
        slug,
        name,
        created_at_ms,
    } = org;
    let mut usage = control.usage.of_org(&slug);
    usage.machines = control.store.count_org_machines(&slug).await?;
    (usage.volumes, usage.volume_gb) = control.store.org_volume_totals(&slug).await?;
    let overrides = control
        .overrides
        .read()
        .ok()
        .and_then(|map| map.get(&slug).copied())
        .unwrap_or_default();
    Ok(Org {
        limits: limits::effective(&control.default_limits, &overrides),
        overrides,
        usage,
        created_at: format_ms(created_at_ms),
        slug,
        name,
    })
}

/// The longest org display name, in bytes.
const MAX_ORG_NAME: usize = 128;

/// An org's display name: free text (Fly's are such as "Acme Corp"), but not empty, not
/// over [`MAX_ORG_NAME`] bytes and without control characters.
fn validate_org_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || name.len() > MAX_ORG_NAME || name.chars().any(char::is_control) {
        return Err(ApiError::invalid_config(
            "name",
            format!("1 to {MAX_ORG_NAME} bytes of text without control characters"),
        ));
    }
    Ok(())
}

/// The org if the caller may see it; another org is answered like a missing one.
async fn visible_org(
    control: &ControlPlane,
    principal: &Principal,
    slug: &str,
) -> Result<OrgRow, ApiError> {
    if !principal.can_see(slug) || validate::validate_name("slug", slug).is_err() {
        return Err(ApiError::not_found(format!("org {slug:?}")));
    }
    control
        .store
        .org(slug)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("org {slug}")))
}

#[utoipa::path(post, path = "/orgs", tag = "orgs", request_body = CreateOrgRequest,
    responses((status = 201, body = Org), (status = "default", body = ErrorBody)))]
pub(crate) async fn create_org(
    State(control): State<Shared>,
    principal: Principal,
    ApiJson(request): ApiJson<CreateOrgRequest>,
) -> Result<(StatusCode, Json<Org>), ApiError> {
    control.create_org(&principal, request).await
}

#[utoipa::path(get, path = "/orgs", tag = "orgs",
    responses((status = 200, body = Vec<Org>), (status = "default", body = ErrorBody)))]
pub(crate) async fn list_orgs(
    State(control): State<Shared>,
    principal: Principal,
) -> Result<Json<Vec<Org>>, ApiError> {
    control.list_orgs(&principal).await
}

#[utoipa::path(get, path = "/orgs/{slug}", tag = "orgs", params(("slug" = String, Path)),
    responses((status = 200, body = Org), (status = "default", body = ErrorBody)))]
pub(crate) async fn get_org(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath(slug): ApiPath<String>,
) -> Result<Json<Org>, ApiError> {
    control.get_org(&principal, &slug).await
}

#[utoipa::path(put, path = "/orgs/{slug}/limits", tag = "orgs", params(("slug" = String, Path)),
    request_body = SetOrgLimitsRequest,
    responses((status = 200, body = Org), (status = "default", body = ErrorBody)))]
pub(crate) async fn set_org_limits(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath(slug): ApiPath<String>,
    ApiJson(request): ApiJson<SetOrgLimitsRequest>,
) -> Result<Json<Org>, ApiError> {
    control.set_org_limits(&principal, &slug, request).await
}

fn token_info(row: &TokenRow) -> TokenInfo {
    TokenInfo {
        id: row.id.clone(),
        org_slug: row.org_slug.clone(),
        name: row.name.clone(),
        created_at: format_ms(row.created_at_ms),
        expires_at: row.expires_at_ms.map(format_ms),
        revoked_at: row.revoked_at_ms.map(format_ms),
    }
}

#[utoipa::path(post, path = "/tokens", tag = "tokens", request_body = CreateTokenRequest,
    responses((status = 201, body = TokenCreated), (status = "default", body = ErrorBody)))]
pub(crate) async fn create_token(
    State(control): State<Shared>,
    principal: Principal,
    ApiJson(request): ApiJson<CreateTokenRequest>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    control.create_token(&principal, request).await
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct TokensQuery {
    /// Only this org's tokens.
    org_slug: Option<String>,
}

#[utoipa::path(get, path = "/tokens", tag = "tokens", params(TokensQuery),
    responses((status = 200, body = Vec<TokenInfo>), (status = "default", body = ErrorBody)))]
pub(crate) async fn list_tokens(
    State(control): State<Shared>,
    principal: Principal,
    ApiQuery(query): ApiQuery<TokensQuery>,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    control.list_tokens(&principal, query).await
}

#[utoipa::path(delete, path = "/tokens/{token_id}", tag = "tokens", params(("token_id" = String, Path)),
    responses((status = 200, body = TokenInfo), (status = "default", body = ErrorBody)))]
pub(crate) async fn revoke_token(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath(token_id): ApiPath<String>,
) -> Result<Json<TokenInfo>, ApiError> {
    control.revoke_token(&principal, &token_id).await
}

impl ControlPlane {
    /// Makes an org (admin only), with any limits of its own.
    pub(crate) async fn create_org(
        &self,
        principal: &Principal,
        request: CreateOrgRequest,
    ) -> Result<(StatusCode, Json<Org>), ApiError> {
        principal.require_admin()?;
        validate::validate_name("slug", &request.slug)?;
        let overrides = SetOrgLimitsRequest {
            quotas: request.quotas,
            rate_limits: request.rate_limits,
        };
        limits::validate_limits(&overrides)?;
        let now = self.clock.now_ms();
        if let Some(name) = &request.name {
            validate_org_name(name)?;
        }
        let name = request.name.as_deref();
        if self.store.insert_org(&request.slug, name, now).await? == Inserted::AlreadyExists {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "already_exists",
                format!("an org named {} already exists", request.slug),
            ));
        }
        if overrides != SetOrgLimitsRequest::default() {
            save_overrides(self, &request.slug, &overrides).await?;
        }
        Ok((
            StatusCode::CREATED,
            Json(
                org_json(
                    self,
                    OrgRow {
                        name: request.name.unwrap_or_else(|| request.slug.clone()),
                        slug: request.slug,
                        created_at_ms: now,
                    },
                )
                .await?,
            ),
        ))
    }

    /// The orgs the caller may see.
    pub(crate) async fn list_orgs(
        &self,
        principal: &Principal,
    ) -> Result<Json<Vec<Org>>, ApiError> {
        self.check_rate(principal, Action::Read, None).await?;
        let mut orgs = Vec::new();
        for org in self.store.orgs().await? {
            if principal.can_see(&org.slug) {
                orgs.push(org_json(self, org).await?);
            }
        }
        Ok(Json(orgs))
    }

    /// One org, if the caller may see it.
    pub(crate) async fn get_org(
        &self,
        principal: &Principal,
        slug: &str,
    ) -> Result<Json<Org>, ApiError> {
        self.check_rate(principal, Action::Read, None).await?;
        let org = visible_org(self, principal, slug).await?;
        Ok(Json(org_json(self, org).await?))
    }

    /// Replaces an org's own limits (admin only).
    pub(crate) async fn set_org_limits(
        &self,
        principal: &Principal,
        slug: &str,
        request: SetOrgLimitsRequest,
    ) -> Result<Json<Org>, ApiError> {
        let org = visible_org(self, principal, slug).await?;
        principal.require_admin()?;
        limits::validate_limits(&request)?;
        save_overrides(self, &org.slug, &request).await?;
        Ok(Json(org_json(self, org).await?))
    }

    /// Mints a token for an org (admin only); its secret is answered once, only its hash kept.
    pub(crate) async fn create_token(
        &self,
        principal: &Principal,
        request: CreateTokenRequest,
    ) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
        principal.require_admin()?;
        validate::validate_name("name", &request.name)?;
        if self.store.org(&request.org_slug).await?.is_none() {
            return Err(ApiError::not_found(format!("org {:?}", request.org_slug)));
        }
        let (id, token) = auth::mint();
        let now = self.clock.now_ms();
        let expires_at_ms = request.expires_in.map(|lifetime| {
            now.saturating_add(i64::try_from(lifetime.0.saturating_mul(1000)).unwrap_or(i64::MAX))
        });
        let row = TokenRow {
            id,
            org_slug: request.org_slug,
            name: request.name,
            hash: auth::sha256(&token),
            created_at_ms: now,
            expires_at_ms,
            revoked_at_ms: None,
        };
        sqlx::query(
            "INSERT INTO tokens (id, org_slug, name, hash, created_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&row.id)
        .bind(&row.org_slug)
        .bind(&row.name)
        .bind(row.hash.to_vec())
        .bind(row.created_at_ms)
        .bind(row.expires_at_ms)
        .execute(self.store.pool())
        .await?;
        let info = token_info(&row);
        let id = row.id.clone();
        self.tokens.put(row);
        self.announce(Change::Token(&id)).await;
        Ok((StatusCode::CREATED, Json(TokenCreated { token, info })))
    }

    /// The tokens the caller may see.
    pub(crate) async fn list_tokens(
        &self,
        principal: &Principal,
        query: TokensQuery,
    ) -> Result<Json<Vec<TokenInfo>>, ApiError> {
        self.check_rate(principal, Action::Read, None).await?;
        Ok(Json(
            self.tokens
                .all()
                .iter()
                .filter(|row| principal.can_see(&row.org_slug))
                .filter(|row| {
                    query
                        .org_slug
                        .as_ref()
                        .is_none_or(|org| *org == row.org_slug)
                })
                .map(token_info)
                .collect(),
        ))
    }

    /// Revokes a token; revoking one already revoked answers it unchanged.
    pub(crate) async fn revoke_token(
        &self,
        principal: &Principal,
        token_id: &str,
    ) -> Result<Json<TokenInfo>, ApiError> {
        self.check_rate(principal, Action::Destroy, None).await?;
        // One made through another replica may not be cached here yet.
        let cached = self.tokens.get(token_id);
        let found = match cached {
            Some(row) => Some(row),
            None => self.tokens.refresh(self.store.pool(), token_id).await?,
        };
        let mut row = found
            .filter(|row| principal.can_see(&row.org_slug))
            .ok_or_else(|| ApiError::not_found(format!("token {token_id:?}")))?;
        if row.revoked_at_ms.is_none() {
            let now = self.clock.now_ms();
            sqlx::query("UPDATE tokens SET revoked_at_ms = $1 WHERE id = $2")
                .bind(now)
                .bind(&row.id)
                .execute(self.store.pool())
                .await?;
            row.revoked_at_ms = Some(now);
            self.tokens.put(row.clone());
            self.announce(Change::Token(&row.id)).await;
        }
        Ok(Json(token_info(&row)))
    }
}
