//! The routes and their OpenAPI description, built from the same declarations: every
//! route is registered through `routes!`, which takes its method and path from the
//! handler's `#[utoipa::path]`, so the description cannot leave one out.

use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use berth_api::Health;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::extract::MAX_JSON_BODY;
use crate::{
    apps, checkpoints, doctor, drain, images, leases, machines, robots, tenancy, usage, volumes,
    workers, Shared,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Berth Machines API",
        description = "Machines that are created once and started in milliseconds. \
            All routes but health and this description need `Authorization: Bearer <token>`. \
            Request bodies take Fly's fields: ones Berth does not know are ignored and listed \
            in the answer's `warnings` (FieldWarning) and `berth-warnings` header, or refused \
            with `berth-strict: true`. Aliases: stop's Go durations and `id`, destroy's \
            `?kill=`, exec's `command` and string `cmd`."
    ),
    components(schemas(berth_api::ErrorBody, berth_api::FieldWarning))
)]
struct ApiDoc;

#[utoipa::path(get, path = "/health", tag = "meta",
    responses((status = 200, body = Health)))]
pub(crate) async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "this description, OpenAPI 3.1")))]
pub(crate) async fn openapi_json(State(control): State<Shared>) -> impl IntoResponse {
    let body = control.openapi_json.get().cloned().unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body)
}

/// Every route of the API, under `/v1`.
pub(crate) fn api_router() -> OpenApiRouter<Shared> {
    let json = OpenApiRouter::new()
        .routes(routes!(tenancy::create_org, tenancy::list_orgs))
        .routes(routes!(tenancy::get_org))
        .routes(routes!(tenancy::set_org_limits))
        .routes(routes!(tenancy::create_token, tenancy::list_tokens))
        .routes(routes!(tenancy::revoke_token))
        .routes(routes!(apps::create_app, apps::list_apps))
        .routes(routes!(apps::get_app, apps::delete_app))
        .routes(routes!(machines::create_machine, machines::list_machines))
        .routes(routes!(
            machines::get_machine,
            machines::update_machine,
            machines::destroy_machine
        ))
        .routes(routes!(machines::start_machine))
        .routes(routes!(machines::stop_machine))
        .routes(routes!(machines::signal_machine))
        .routes(routes!(machines::restart_machine))
        .routes(routes!(machines::suspend_machine))
        .routes(routes!(machines::cordon_machine))
        .routes(routes!(machines::migrate_machine))
        .routes(routes!(machines::recreate_machine))
        .routes(routes!(machines::uncordon_machine))
        .routes(routes!(machines::machine_processes))
        .routes(routes!(machines::machine_versions))
        .routes(routes!(
            checkpoints::create_checkpoint,
            checkpoints::list_checkpoints
        ))
        .routes(routes!(checkpoints::delete_checkpoint))
        .routes(routes!(checkpoints::restore_checkpoint))
        .routes(routes!(checkpoints::fork_machine))
        .routes(routes!(robots::wait_machine))
        .routes(routes!(robots::machine_events))
        .routes(routes!(robots::exec_machine))
        .routes(routes!(robots::machine_logs))
        .routes(routes!(robots::get_metadata))
        .routes(routes!(robots::set_metadata, robots::delete_metadata))
        .routes(routes!(
            leases::acquire_lease,
            leases::get_lease,
            leases::release_lease
        ))
        .routes(routes!(volumes::create_volume, volumes::list_volumes))
        .routes(routes!(
            volumes::get_volume,
            volumes::update_volume,
            volumes::delete_volume
        ))
        .routes(routes!(volumes::extend_volume))
        .routes(routes!(volumes::list_snapshots, volumes::create_snapshot))
        .routes(routes!(images::list_images, images::delete_image))
        .routes(routes!(images::pull_image))
        .routes(routes!(images::prune_images))
        .routes(routes!(images::delete_image_by_path))
        .routes(routes!(usage::org_usage))
        .routes(routes!(workers::list))
        .routes(routes!(workers::cordon))
        .routes(routes!(drain::get_worker))
        .routes(routes!(drain::drain_worker))
        .routes(routes!(workers::uncordon))
        .routes(routes!(doctor::check))
        .routes(routes!(doctor::repair))
        .routes(routes!(health))
        .routes(routes!(openapi_json))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY));
    // Archive uploads stream to disk, so they take no JSON body limit.
    let uploads = OpenApiRouter::new()
        .routes(routes!(images::import_image))
        .layer(DefaultBodyLimit::disable());
    OpenApiRouter::with_openapi(ApiDoc::openapi()).nest("/v1", json.merge(uploads))
}
