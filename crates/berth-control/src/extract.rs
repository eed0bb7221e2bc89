//! Request parsing at the edge: bodies and path segments become typed values or a JSON
//! error naming what was wrong. Nothing malformed gets further.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use berth_api::{ChangeSource, FieldWarning, STRICT_HEADER};
use berth_worker::EventSource;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::idempotency::IdempotencyKey;
use crate::leases::LeaseNonce;
use crate::warnings::Warnings;
use crate::Shared;

/// The largest JSON body any endpoint takes.
pub const MAX_JSON_BODY: usize = 1024 * 1024;

/// A JSON body, refused with `invalid_config` naming the offending field. Fields the type
/// does not know are ignored and told as warnings, or refused under `berth-strict: true`.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let mode = Mode::of(&request)?;
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok());
        if let Some(content_type) = content_type {
            if !content_type.starts_with("application/json") {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    format!("expected application/json, got {content_type}"),
                ));
            }
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        format!("the body is larger than {MAX_JSON_BODY} bytes"),
                    )
                } else {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_config",
                        rejection.body_text(),
                    )
                }
            })?;
        mode.parse(&bytes).map(ApiJson)
    }
}

/// An optional JSON body: empty means the default.
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let mode = Mode::of(&request)?;
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        format!("the body is larger than {MAX_JSON_BODY} bytes"),
                    )
                } else {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_config",
                        rejection.body_text(),
                    )
                }
            })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        mode.parse(&bytes).map(OptionalJson)
    }
}

/// How a body's unknown fields are met: told (the default) or refused.
struct Mode {
    strict: bool,
    warnings: Option<Warnings>,
}

impl Mode {
    fn of(request: &Request) -> Result<Mode, ApiError> {
        let strict = match header_text(request.headers(), STRICT_HEADER, "invalid_config")? {
            None => false,
            Some(value) if value.eq_ignore_ascii_case("true") || value == "1" => true,
            Some(value) if value.eq_ignore_ascii_case("false") || value == "0" => false,
            Some(_) => {
                return Err(ApiError::invalid_config(
                    STRICT_HEADER,
                    format!("the {STRICT_HEADER} header is true or false"),
                ))
            }
        };
        let warnings = request.extensions().get::<Warnings>().cloned();
        Ok(Mode { strict, warnings })
    }

    fn parse<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, ApiError> {
        let (value, ignored) = parse_json_lenient(bytes)?;
        if self.strict {
            if let Some(field) = ignored.into_iter().next() {
                return Err(unknown_field(field));
            }
        } else if let Some(warnings) = &self.warnings {
            for field in ignored {
                warnings.push(FieldWarning::ignored(field));
            }
        }
        Ok(value)
    }
}

fn unknown_field(field: String) -> ApiError {
    ApiError::invalid_config(
        field.clone(),
        format!("{field}: unknown field ({STRICT_HEADER} is true)"),
    )
}

/// Parses strictly: a field the type does not know is refused, naming its path.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let (value, ignored) = parse_json_lenient(bytes)?;
    match ignored.into_iter().next() {
        Some(field) => Err(unknown_field(field)),
        None => Ok(value),
    }
}

/// Parses, and names the paths of the fields the type ignored (in the order met). Types
/// that deny unknown fields refuse them here already.
pub fn parse_json_lenient<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, Vec<String>), ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let mut ignored = Vec::new();
    let mut note = |path: serde_ignored::Path<'_>| ignored.push(path_text(&path));
    let tracked = serde_ignored::Deserializer::new(&mut deserializer, &mut note);
    let value = serde_path_to_error::deserialize(tracked).map_err(|error| {
        let path = error.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        ApiError::invalid_config(field.clone(), format!("{field}: {}", error.inner()))
    })?;
    deserializer.end().map_err(|error| {
        ApiError::invalid_config(
            "body",
            format!("trailing data after the JSON value: {error}"),
        )
    })?;
    Ok((value, ignored))
}

/// A path as `serde_path_to_error` writes them (`config.services[0].ports`), so warnings
/// and errors name fields alike.
fn path_text(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", path_text(parent)),
        Path::Map { parent, key } => {
            let parent = path_text(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => path_text(parent),
    }
}

/// Path parameters. Ones that cannot even be decoded (invalid UTF-8 after percent
/// decoding) name nothing that exists: 404, like any unknown name.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(ApiPath(value)),
            Err(_) => Err(ApiError::not_found("resource")),
        }
    }
}

/// Query parameters, refused with `invalid_config` naming the query.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(ApiError::invalid_config("query", rejection.body_text())),
        }
    }
}

/// What a call that changes a Machine's run (start, stop, destroy) carries besides its
/// body, parsed: who asks, the idempotency key and the lease nonce. The caller is
/// authenticated first, so an anonymous call learns nothing about its headers.
pub(crate) struct Preconditions {
    pub principal: Principal,
    pub key: Option<IdempotencyKey>,
    pub nonce: Option<LeaseNonce>,
}

impl FromRequestParts<Shared> for Preconditions {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, control: &Shared) -> Result<Self, ApiError> {
        let principal = Principal::from_request_parts(parts, control).await?;
        let key = Option::<IdempotencyKey>::from_request_parts(parts, control).await?;
        let nonce = Option::<LeaseNonce>::from_request_parts(parts, control).await?;
        Ok(Preconditions {
            principal,
            key,
            nonce,
        })
    }
}

impl Preconditions {
    /// Who the change is recorded as made by. Only the operator (the proxy runs with the
    /// admin token) may record a start or stop as something other than the caller's own.
    pub fn source(&self, asked: Option<ChangeSource>) -> Result<EventSource, ApiError> {
        match asked {
            None | Some(ChangeSource::User) => Ok(EventSource::User),
            Some(other) => {
                self.principal.require_admin()?;
                Ok(EventSource::from(other))
            }
        }
    }
}

/// A header's value as text, if present; one that is not visible ASCII is refused.
pub fn header_text<'a>(
    headers: &'a axum::http::HeaderMap,
    name: &str,
    code: &str,
) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value.to_str().map(Some).map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                code,
                format!("the {name} header must be visible ASCII"),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api::CreateMachineRequest;

    #[test]
    fn errors_name_the_field_path() {
        let error =
            parse_json::<CreateMachineRequest>(br#"{"config":{"image":"x","guest":{"cpus":-1}}}"#)
                .expect_err("refused");
        assert_eq!(error.body.field.as_deref(), Some("config.guest.cpus"));
        let error = parse_json::<CreateMachineRequest>(br#"{"config":{"image":"x"},"nope":1}"#)
            .expect_err("refused");
        assert_eq!(error.body.error, "invalid_config");
        assert_eq!(error.body.field.as_deref(), Some("nope"));
        let error = parse_json::<CreateMachineRequest>(
            br#"{"config":{"image":"x","services":[{"internal_port":80,"zap":1}]}}"#,
        )
        .expect_err("refused");
        assert_eq!(error.body.field.as_deref(), Some("config.services[0].zap"));
        assert!(parse_json::<CreateMachineRequest>(b"{not json").is_err());
        assert!(parse_json::<CreateMachineRequest>(b"\xff\xfe").is_err());
        assert!(parse_json::<CreateMachineRequest>(
            br#"{"config":{"image":"x","guest":{"memory_mb":99999999999999999999}}}"#
        )
        .is_err());
    }

    #[test]
    fn lenient_parsing_names_what_it_ignored() {
        let (request, ignored) = parse_json_lenient::<CreateMachineRequest>(
            br#"{"config":{"image":"x","guest":{"cpu_kind":"shared","gpus":1},
                 "services":[{"internal_port":80,"force_instance_key":null,"zap":{"a":1}}]},
                 "lease_ttl":10,"lsvd":true,"skip_secrets":false}"#,
        )
        .expect("parses");
        assert_eq!(request.config.guest.cpu_kind.as_deref(), Some("shared"));
        assert_eq!(request.lease_ttl, Some(10));
        assert_eq!(
            ignored,
            ["config.guest.gpus", "config.services[0].zap", "lsvd"]
        );
        // Type errors in known fields are still refused, naming the field.
        let error = parse_json_lenient::<CreateMachineRequest>(
            br#"{"config":{"image":"x","guest":{"cpus":"two"}},"extra":1}"#,
        )
        .expect_err("refused");
        assert_eq!(error.body.field.as_deref(), Some("config.guest.cpus"));
    }
}
