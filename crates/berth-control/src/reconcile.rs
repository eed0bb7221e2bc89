//! The index against the workers: a worker is the truth about its Machines. A create the
//! worker rolled back after a crash (it never answered) leaves an index entry that no
//! Machine stands behind; it is forgotten here, so the name and the quota slot free up.

use std::sync::Arc;

use berth_api::Machine;
use berth_worker::{WorkerError, WorkerService};

use crate::ControlPlane;

/// Drops the index entries of `app` on worker `name` that the worker does not list and,
/// asked again one by one, answers `not_found` for. Any other answer keeps the entry.
pub(crate) async fn forget_lost(
    control: &ControlPlane,
    name: &str,
    worker: &Arc<dyn WorkerService>,
    app: &str,
    listed: &[Machine],
) {
    let rows = match control.store.machines(app).await {
        Ok(rows) => rows,
        Err(error) => {
            tracing::warn!(%error, "listing the index to reconcile it");
            return;
        }
    };
    for row in rows.iter().filter(|row| row.worker == name) {
        if listed.iter().any(|machine| machine.id == row.id) {
            continue;
        }
        if worker_lacks(worker, &row.id).await {
            tracing::info!(machine = %row.id, worker = %name, "forgetting a Machine its worker does not have");
            if let Err(error) = control.store.delete_machine(&row.id).await {
                tracing::warn!(%error, "forgetting a lost Machine");
            }
        }
    }
}

/// Whether the worker positively answers that it has no Machine `id`; an unreachable
/// worker or any other answer is not proof.
pub(crate) async fn worker_lacks(worker: &Arc<dyn WorkerService>, id: &str) -> bool {
    match worker.get(id).await {
        Err(WorkerError::NotFound(_)) => true,
        Err(WorkerError::Remote { status: 404, body }) => body.error == "not_found",
        _ => false,
    }
}

/// Destroys the copies worker `name` still lists of Machines the index places elsewhere
/// and no move is settling: a worker that came back after its Machines were recreated
/// elsewhere, or moved away while it was unreachable.
pub(crate) async fn remove_stale(
    control: &ControlPlane,
    name: &str,
    worker: &Arc<dyn WorkerService>,
    app: &str,
    listed: &[Machine],
) {
    for machine in listed {
        let Ok(Some(row)) = control.store.machine(app, &machine.id).await else {
            continue;
        };
        if row.worker == name || control.move_recorded(&machine.id).await {
            continue;
        }
        tracing::warn!(machine = %machine.id, worker = %name, now_on = %row.worker, "removing a stale copy of a Machine that lives elsewhere");
        let forget = berth_worker::MigrationStep::Forget {
            id: machine.id.clone(),
        };
        if let Err(error) = worker.migration(forget).await {
            tracing::warn!(machine = %machine.id, %error, "removing a stale copy");
        }
    }
}
