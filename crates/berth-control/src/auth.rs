//! Who is calling: the operator's admin token, or a token of one org. Tokens are
//! `bt_<id>_<secret>`; only the SHA-256 of the whole token is stored, and it is compared
//! in constant time. Every failure is the same 401, whether or not the token ever existed.

use std::collections::HashMap;
use std::sync::RwLock;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use sqlx::{AnyPool, Row};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::{ControlPlane, Shared};

pub(crate) const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS tokens (
        id TEXT PRIMARY KEY NOT NULL,
        org_slug TEXT NOT NULL REFERENCES orgs(slug),
        name TEXT NOT NULL,
        hash BLOB NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER,
        revoked_at_ms INTEGER
    )"];

const TOKEN_PREFIX: &str = "bt_";

/// The caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The operator: sees every org, is never rate limited.
    Admin,
    Org {
        slug: String,
        token_id: String,
        token_name: String,
    },
}

impl Principal {
    /// The org this caller is confined to; `None` for the admin.
    pub fn org(&self) -> Option<&str> {
        match self {
            Principal::Admin => None,
            Principal::Org { slug, .. } => Some(slug),
        }
    }

    pub fn can_see(&self, org: &str) -> bool {
        self.org().is_none_or(|own| own == org)
    }

    /// How the caller is named as a lease's owner.
    pub fn owner(&self) -> String {
        match self {
            Principal::Admin => "admin".to_owned(),
            Principal::Org { token_name, .. } => token_name.clone(),
        }
    }

    /// What idempotency keys are scoped to.
    pub fn scope(&self) -> String {
        match self {
            Principal::Admin => "admin".to_owned(),
            Principal::Org { token_id, .. } => format!("token:{token_id}"),
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Org { .. } => {
                Err(ApiError::forbidden("this needs the operator's admin token"))
            }
        }
    }
}

/// A token as the control plane keeps it in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub org_slug: String,
    pub name: String,
    pub hash: [u8; 32],
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
}

pub(crate) fn sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// A new token: its id and the secret text shown once.
pub(crate) fn mint() -> (String, String) {
    let id = hex::encode(rand::random::<[u8; 8]>());
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let token = format!("{TOKEN_PREFIX}{id}_{secret}");
    (id, token)
}

fn token_id(token: &str) -> Option<&str> {
    token
        .strip_prefix(TOKEN_PREFIX)
        .and_then(|rest| rest.split_once('_'))
        .map(|(id, _)| id)
}

/// Tokens by id, loaded from the store at start and kept in step with it: by this
/// replica's own changes, by the other replicas' notices (`caches`), and by a read of the
/// store when a token is not here (one made through another replica a moment ago).
#[derive(Debug, Default)]
pub(crate) struct TokenCache {
    by_id: RwLock<HashMap<String, TokenRow>>,
}

/// The stored tokens, or the one of `id`.
async fn read_tokens(pool: &AnyPool, id: Option<&str>) -> Result<Vec<TokenRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, org_slug, name, hash, created_at_ms, expires_at_ms, revoked_at_ms FROM tokens
         WHERE $1 IS NULL OR id = $1",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let hash: Vec<u8> = row.get(3);
            let hash = <[u8; 32]>::try_from(hash.as_slice()).ok()?;
            Some(TokenRow {
                id: row.get(0),
                org_slug: row.get(1),
                name: row.get(2),
                hash,
                created_at_ms: row.get(4),
                expires_at_ms: row.get(5),
                revoked_at_ms: row.get(6),
            })
        })
        .collect())
}

impl TokenCache {
    pub(crate) async fn load(pool: &AnyPool) -> Result<TokenCache, sqlx::Error> {
        let cache = TokenCache::default();
        cache.reload(pool).await?;
        Ok(cache)
    }

    /// Reads every token again.
    pub(crate) async fn reload(&self, pool: &AnyPool) -> Result<(), sqlx::Error> {
        let by_id = read_tokens(pool, None)
            .await?
            .into_iter()
            .map(|token| (token.id.clone(), token))
            .collect();
        if let Ok(mut map) = self.by_id.write() {
            *map = by_id;
        }
        Ok(())
    }

    /// Reads the token `id` again; answers it, or `None` when it is not stored.
    pub(crate) async fn refresh(
        &self,
        pool: &AnyPool,
        id: &str,
    ) -> Result<Option<TokenRow>, sqlx::Error> {
        let found = read_tokens(pool, Some(id)).await?.into_iter().next();
        if let Ok(mut map) = self.by_id.write() {
            match &found {
                Some(token) => map.insert(id.to_owned(), token.clone()),
                None => map.remove(id),
            };
        }
        Ok(found)
    }

    pub(crate) fn put(&self, token: TokenRow) {
        if let Ok(mut by_id) = self.by_id.write() {
            by_id.insert(token.id.clone(), token);
        }
    }

    pub(crate) fn get(&self, id: &str) -> Option<TokenRow> {
        self.by_id.read().ok()?.get(id).cloned()
    }

    pub(crate) fn all(&self) -> Vec<TokenRow> {
        let mut tokens: Vec<TokenRow> = self
            .by_id
            .read()
            .map(|by_id| by_id.values().cloned().collect())
            .unwrap_or_default();
        tokens.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        tokens
    }
}

impl ControlPlane {
    /// Who `token` is, or 401.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Principal, ApiError> {
        let token = token.ok_or_else(ApiError::unauthorized)?;
        let hash = sha256(token);
        if bool::from(hash.ct_eq(&self.admin_token_hash)) {
            return Ok(Principal::Admin);
        }
        let found = token_id(token).and_then(|id| self.tokens.get(id));
        // Compare against something either way, so timing does not tell a known id.
        let expected = found.as_ref().map_or([0u8; 32], |row| row.hash);
        let matches = bool::from(hash.ct_eq(&expected));
        let Some(row) = found.filter(|_| matches) else {
            return Err(ApiError::unauthorized());
        };
        let now = self.clock.now_ms();
        if row.revoked_at_ms.is_some() || row.expires_at_ms.is_some_and(|at| at <= now) {
            return Err(ApiError::unauthorized());
        }
        Ok(Principal::Org {
            slug: row.org_slug,
            token_id: row.id,
            token_name: row.name,
        })
    }
}

impl FromRequestParts<Shared> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, control: &Shared) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        // A token this replica has not seen may have been made through another one a
        // moment ago: the store has the last word.
        if let Some(id) = token.and_then(token_id) {
            if control.tokens.get(id).is_none() {
                control.tokens.refresh(control.store.pool(), id).await?;
            }
        }
        control.authenticate(token)
    }
}
