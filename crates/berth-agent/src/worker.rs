//! The local worker behind [`WorkerService`]: every state-changing call runs detached
//! (see [`crate::ops`]) and settles its Machine if it failed halfway; the rest delegate to
//! the module that holds them.

use std::sync::Arc;

use async_trait::async_trait;
use berth_api::{Machine, StartStopResponse, StopRequest, UpdateMachineRequest, UsageRecord};
use berth_image::PullScope;
use berth_worker::{Result, WorkerError};

use crate::error::AgentError;
use crate::ops::detached;
use crate::record::PendingOp;
use crate::service::{
    CreateOnWorker, EventSource, ExecOnWorker, ImageUsage, LogChunk, NoticeSnapshot,
    WorkerListener, WorkerService,
};
use crate::Agent;

#[async_trait]
impl WorkerService for Agent {
    async fn create(&self, request: CreateOnWorker) -> Result<Machine> {
        let agent = self.clone();
        detached(async move {
            let id = request.id.clone();
            let result = agent.create_op(request).await;
            agent.settle_if_failed(&id, result).await
        })
        .await
        .map_err(WorkerError::from)
    }

    async fn start(&self, id: &str, source: EventSource) -> Result<StartStopResponse> {
        let agent = self.clone();
        let id = id.to_owned();
        detached(async move {
            let result = agent.start_op(&id, source).await;
            agent.settle_if_failed(&id, result).await
        })
        .await
        .map_err(WorkerError::from)
    }

    async fn suspend(&self, id: &str, source: EventSource) -> Result<StartStopResponse> {
        let agent = self.clone();
        let id = id.to_owned();
        detached(async move {
            let result = agent.suspend_op(&id, source).await;
            agent.settle_if_failed(&id, result).await
        })
        .await
        .map_err(WorkerError::from)
    }

    async fn stop(&self, id: &str, request: StopRequest) -> Result<StartStopResponse> {
        let agent = self.clone();
        let id = id.to_owned();
        detached(async move {
            let result = agent.stop_op(&id, request).await;
            agent.settle_if_failed(&id, result).await
        })
        .await
        .map_err(WorkerError::from)
    }

    async fn signal(&self, id: &str, signal: &str) -> Result<()> {
        Ok(self.signal_in(id, signal).await?)
    }

    async fn update(
        &self,
        id: &str,
        request: UpdateMachineRequest,
        pull: PullScope,
    ) -> Result<Machine> {
        let agent = self.clone();
        let id = id.to_owned();
        detached(async move {
            let result = agent.update_op(&id, request, pull).await;
            agent.settle_if_failed(&id, result).await
        })
        .await
        .map_err(WorkerError::from)
    }

    async fn destroy(&self, id: &str, force: bool) -> Result<()> {
        let agent = self.clone();
        let id = id.to_owned();
        detached(async move {
            let result = agent.destroy_op(&id, force).await;
            agent.settle_if_failed(&id, result).await
        })
        .await
        .map_err(WorkerError::from)
    }

    async fn get(&self, id: &str) -> Result<Machine> {
        match self.load(id).await {
            // A create of this id still running (its caller may have given up on it) is
            // neither the absence the control plane forgets an index entry for, nor a
            // Machine yet: it may still roll back.
            Err(AgentError::NotFound(_)) if self.operation_running(id) => {
                Err(WorkerError::Busy { id: id.to_owned() })
            }
            Ok(record)
                if record.pending == Some(PendingOp::Create) && self.operation_running(id) =>
            {
                Err(WorkerError::Busy { id: id.to_owned() })
            }
            other => {
                let record = other?;
                let mut answered = self
                    .with_recent_events(&record.app, vec![self.api_view(&record)])
                    .await?;
                answered
                    .pop()
                    .ok_or_else(|| WorkerError::internal("the machine went missing"))
            }
        }
    }

    async fn list(&self, app: &str) -> Result<Vec<Machine>> {
        let machines = self
            .inner
            .store
            .list_app(app)
            .await?
            .iter()
            // A create not yet finished is not a Machine: it completes or rolls back. An
            // arrival is not this worker's Machine until the control plane commits it.
            .filter(|record| {
                !matches!(
                    record.pending,
                    Some(PendingOp::Create | PendingOp::MigrateIn { .. })
                )
            })
            .map(|record| self.api_view(record))
            .collect();
        Ok(self.with_recent_events(app, machines).await?)
    }

    async fn cordon(&self, id: &str, cordoned: bool) -> Result<Machine> {
        Ok(self.set_cordon(id, cordoned).await?)
    }

    async fn processes(&self, id: &str) -> Result<Vec<berth_api::ProcessStat>> {
        Ok(self.list_processes(id).await?)
    }

    async fn versions(&self, id: &str) -> Result<Vec<berth_api::MachineVersion>> {
        Ok(self.config_versions(id).await?)
    }

    async fn usage_since(&self, after_seq: u64, limit: u32) -> Result<Vec<UsageRecord>> {
        Ok(self.inner.store.usage_since(after_seq, limit).await?)
    }

    async fn logs(&self, id: &str, max_bytes: u64) -> Result<Vec<u8>> {
        Ok(self.tail_logs(id, max_bytes).await?)
    }

    async fn image_usage(&self) -> Result<Vec<ImageUsage>> {
        Ok(self.image_usage_now().await?)
    }

    fn set_listener(&self, listener: Arc<dyn WorkerListener>) {
        self.listen(listener);
    }

    async fn notice_snapshot(&self) -> Result<NoticeSnapshot> {
        Ok(self.snapshot_notices().await?)
    }

    async fn machine_events(
        &self,
        id: &str,
        since: i64,
        limit: u32,
    ) -> Result<Vec<berth_api::MachineEvent>> {
        Ok(self.event_page(id, since, limit).await?)
    }

    async fn exec(&self, id: &str, request: ExecOnWorker) -> Result<berth_api::ExecResponse> {
        Ok(self.exec_in(id, request).await?)
    }

    async fn set_metadata(&self, id: &str, key: &str, value: Option<String>) -> Result<Machine> {
        Ok(self.change_metadata(id, key, value).await?)
    }

    async fn read_logs(
        &self,
        id: &str,
        since: Option<u64>,
        follow: bool,
        max_bytes: u64,
    ) -> Result<tokio::sync::mpsc::Receiver<LogChunk>> {
        Ok(self.stream_logs(id, since, follow, max_bytes).await?)
    }

    async fn doctor(&self, repair: bool) -> Result<berth_api::DoctorReport> {
        Ok(self.run_doctor(repair).await?)
    }

    async fn volume_create(
        &self,
        request: crate::service::CreateVolumeOnWorker,
    ) -> Result<berth_api::Volume> {
        let agent = self.clone();
        detached(async move { agent.volume_create_op(request).await })
            .await
            .map_err(WorkerError::from)
    }

    async fn volume_get(&self, id: &str) -> Result<berth_api::Volume> {
        Ok(self.volume_get_op(id).await?)
    }

    async fn volume_list(&self, app: &str) -> Result<Vec<berth_api::Volume>> {
        Ok(self.volume_list_op(app).await?)
    }

    async fn volume_update(
        &self,
        id: &str,
        request: berth_api::UpdateVolumeRequest,
    ) -> Result<berth_api::Volume> {
        Ok(self.volume_update_op(id, request).await?)
    }

    async fn volume_extend(&self, id: &str, size_gb: u32) -> Result<berth_api::Volume> {
        let agent = self.clone();
        let id = id.to_owned();
        detached(async move { agent.volume_extend_op(&id, size_gb).await })
            .await
            .map_err(WorkerError::from)
    }

    async fn volume_delete(&self, id: &str) -> Result<berth_api::Volume> {
        let agent = self.clone();
        let id = id.to_owned();
        detached(async move { agent.volume_delete_op(&id).await })
            .await
            .map_err(WorkerError::from)
    }

    async fn volume_snapshots(&self, id: &str) -> Result<Vec<berth_api::VolumeSnapshot>> {
        Ok(self.volume_snapshots_op(id).await?)
    }

    async fn volume_snapshot(&self, id: &str) -> Result<berth_api::VolumeSnapshot> {
        let agent = self.clone();
        let id = id.to_owned();
        detached(async move { agent.volume_snapshot_op(&id).await })
            .await
            .map_err(WorkerError::from)
    }

    async fn checkpoint_create(&self, id: &str, comment: String) -> Result<berth_api::Checkpoint> {
        let agent = self.clone();
        let id = id.to_owned();
        detached(async move { agent.checkpoint_create_op(&id, comment).await })
            .await
            .map_err(WorkerError::from)
    }

    async fn checkpoint_list(&self, id: &str) -> Result<Vec<berth_api::Checkpoint>> {
        Ok(self.checkpoint_list_op(id).await?)
    }

    async fn checkpoint_delete(&self, id: &str, checkpoint: &str) -> Result<()> {
        let agent = self.clone();
        let (id, checkpoint) = (id.to_owned(), checkpoint.to_owned());
        detached(async move { agent.checkpoint_delete_op(&id, &checkpoint).await })
            .await
            .map_err(WorkerError::from)
    }

    async fn checkpoint_restore(
        &self,
        id: &str,
        checkpoint: &str,
    ) -> Result<berth_api::RestoreCheckpointResponse> {
        let agent = self.clone();
        let (id, checkpoint) = (id.to_owned(), checkpoint.to_owned());
        detached(async move {
            let result = agent.checkpoint_restore_op(&id, &checkpoint).await;
            agent.settle_if_failed(&id, result).await
        })
        .await
        .map_err(WorkerError::from)
    }

    async fn migration(
        &self,
        step: berth_worker::MigrationStep,
    ) -> Result<berth_worker::MigrationAnswer> {
        let agent = self.clone();
        crate::ops::detached(async move { agent.migration_op(step).await })
            .await
            .map_err(WorkerError::from)
    }

    async fn migration_stream(
        &self,
        id: &str,
        request: berth_worker::StreamRequest,
    ) -> Result<berth_worker::MigrationStream> {
        Ok(self.migration_stream_op(id, request).await?)
    }
}
