//! Create: resolve the image before anything is recorded, record the Machine with its
//! create pending, lay out its rootfs and network, then clear the pending mark.

use berth_api::{EventKind, Machine, MachineState};
use berth_core::validate;
use tracing::warn;

use crate::error::{AgentError, Result};
use crate::failpoint;
use crate::metering;
use crate::record::{now_ms, MachineRecord, PendingOp};
use crate::service::{CreateOnWorker, EventSource};
use crate::transition::Change;
use crate::{machine_address, Agent};

impl Agent {
    pub(crate) async fn create_op(&self, request: CreateOnWorker) -> Result<Machine> {
        validate::validate_name("name", &request.name)?;
        validate::validate_config(&request.config)?;
        let mut request = request;
        // The driver is recorded with the Machine, so it keeps it whatever the default
        // becomes; one this worker lacks is refused before anything is done.
        let driver = self.driver(&request.config)?.clone();
        request
            .config
            .runtime
            .get_or_insert_with(|| self.inner.drivers.default_name().to_owned());
        let _guard = self.lock(&request.id).await?;
        // A disk without room for the reserve could not roll this create back.
        self.inner.store.refill_reserve().await?;
        // A retried create (the answer was lost on the network) finds its own Machine.
        if let Some(existing) = self.inner.store.get(&request.id).await? {
            if existing.app == request.app && existing.name == request.name {
                return Ok(existing.to_api());
            }
            return Err(AgentError::Internal(format!(
                "machine id {} is already taken",
                request.id
            )));
        }
        // The slow part, before anything is recorded: a missing image leaves no trace. The
        // lease holds the layers until the record that references them is written.
        let lease = self.inner.images.lease();
        let (image, pull_events) = self
            .resolve_image(&request.config.image, &lease, &request.pull)
            .await?;
        let files = crate::files::guest_files(&request.config)?;
        // A fork's source checkpoint is checked before anything is recorded.
        let fork = match &request.from_checkpoint {
            Some((source, checkpoint)) => Some(self.checkpoint_for_fork(source, checkpoint).await?),
            None => None,
        };
        let now = now_ms();
        let mut record = MachineRecord {
            id: request.id.clone(),
            app: request.app,
            name: request.name,
            region: self.inner.config.region.clone(),
            state: MachineState::Created,
            instance_id: berth_core::ids::new_instance_id(u64::try_from(now).unwrap_or_default()),
            config: request.config,
            image_ref: Self::image_ref(&image),
            rootfs: self.rootfs_stack(&request.id, &image),
            created_at_ms: now,
            updated_at_ms: now,
            last_exit: None,
            restart_count: 0,
            run_generation: 0,
            pending: Some(PendingOp::Create),
            run_open: false,
            storage_bytes: 0,
            private_ip: self
                .inner
                .config
                .machine_prefix
                .as_ref()
                .and_then(|prefix| machine_address(prefix, &request.id)),
            restart_due_ms: None,
            org: request.org,
            cordoned: false,
            memory_bytes: 0,
            checkpoint_bytes: 0,
        };
        let mut spec = self.machine_spec(&record, &record.config, &image)?;
        // Claimed before the record is written: a crash in between leaves a claim by a
        // Machine that does not exist, which recovery releases.
        spec.volumes = self
            .attach_volumes(&record.id, &record.app, &mut record.config.mounts)
            .await?;
        let volumes: Vec<String> = record
            .config
            .mounts
            .iter()
            .map(|mount| mount.volume.clone())
            .collect();
        if let Err(error) = self.inner.store.save(&record, None).await {
            self.release_volumes(&record.id, &volumes).await;
            return Err(error);
        }
        failpoint::hit("create.after_record");
        let layout = self.layout(&record.id);
        // Every step until the record leaves `pending` rolls back on failure: a full disk
        // can refuse the events or the state write as well as the layout itself.
        let laid_out = async {
            driver.prepare(&layout, &spec).await?;
            if let Some(source) = fork {
                self.fork_disk(&record, source).await?;
                failpoint::hit("create.after_fork");
            }
            self.write_guest_files(&record.id, files, record.rootfs.lowerdirs())
                .await?;
            failpoint::hit("create.after_prepare");
            record.pending = None;
            self.inner
                .store
                .add_events(&record.id, &pull_events)
                .await?;
            let usage = [metering::created(&record)];
            let change = Change::event(EventKind::Create, EventSource::User)
                .usage(&usage)
                .version();
            self.save_in_state(&record, change).await
        }
        .await;
        if let Err(error) = laid_out {
            if let Err(remove_error) = driver.remove(&layout).await {
                warn!(machine = %record.id, %remove_error, "removing a half-created machine");
            }
            // If even the delete fails, the record keeps its pending create, which recovery
            // rolls back.
            self.inner.store.delete_rollback(&record.id).await?;
            self.release_volumes(&record.id, &volumes).await;
            return Err(error);
        }
        failpoint::hit("create.after_record_created");
        drop(lease);
        if !request.skip_launch {
            self.boot(&mut record, EventSource::User).await?;
        }
        Ok(self.api_view(&record))
    }
}
