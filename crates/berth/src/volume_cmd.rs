//! `berth volume`: Fly's volumes API from the command line.

use anyhow::Result;
use berth_api::{CreateVolumeRequest, ExtendVolumeRequest, Volume, VolumeSnapshot};
use clap::Subcommand;

use crate::commands::print_json;
use crate::ApiArgs;

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Make a volume on a worker; attach it with `berth machine create --volume ID:/path`.
    Create {
        #[arg(long)]
        app: String,
        /// The volume's name (several volumes may share one).
        #[arg(long)]
        name: String,
        #[arg(long)]
        region: Option<String>,
        /// Size in GB; 3 when not given, as on Fly.
        #[arg(long)]
        size_gb: Option<u32>,
        /// Restore this snapshot into the new volume.
        #[arg(long)]
        snapshot: Option<String>,
        /// Fork this volume: the new one starts as a copy of its data now, on its worker.
        #[arg(long)]
        source_volume: Option<String>,
        /// Leave the volume's data unencrypted on the worker's disk (flyctl's flag).
        #[arg(long)]
        no_encryption: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List an app's volumes.
    List {
        #[arg(long)]
        app: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one volume as JSON.
    Show {
        #[arg(long)]
        app: String,
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Grow a volume to a new size in GB.
    Extend {
        #[arg(long)]
        app: String,
        id: String,
        #[arg(long)]
        size_gb: u32,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Take a snapshot of a volume now.
    Snapshot {
        #[arg(long)]
        app: String,
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List a volume's snapshots.
    Snapshots {
        #[arg(long)]
        app: String,
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a volume that no Machine holds, with its snapshots.
    Delete {
        #[arg(long)]
        app: String,
        id: String,
        /// Admin: forget a volume whose worker is unavailable (its data is lost); its copy
        /// there is deleted if the worker comes back.
        #[arg(long)]
        lose_state: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn volume(command: VolumeCommand) -> Result<()> {
    match command {
        VolumeCommand::Create {
            app,
            name,
            region,
            size_gb,
            snapshot,
            source_volume,
            no_encryption,
            json,
            api,
        } => {
            let request = CreateVolumeRequest {
                name,
                region,
                size_gb,
                snapshot_id: snapshot,
                source_volume_id: source_volume,
                encrypted: Some(!no_encryption),
                ..CreateVolumeRequest::default()
            };
            let volume: Volume = api
                .client()?
                .post(&format!("/v1/apps/{app}/volumes"), &request)
                .await?;
            if json {
                return print_json(&volume);
            }
            println!("{}", volume.id);
        }
        VolumeCommand::List { app, json, api } => {
            let volumes: Vec<Volume> = api
                .client()?
                .get(&format!("/v1/apps/{app}/volumes"))
                .await?;
            if json {
                return print_json(&volumes);
            }
            println!(
                "{:<26} {:<16} {:<10} {:>7} {:>9} ATTACHED",
                "ID", "NAME", "STATE", "SIZE_GB", "USED_MB"
            );
            for volume in volumes {
                let used = volume.blocks.saturating_sub(volume.blocks_free) * volume.block_size;
                println!(
                    "{:<26} {:<16} {:<10} {:>7} {:>9} {}",
                    volume.id,
                    volume.name,
                    volume.state,
                    volume.size_gb,
                    used / (1024 * 1024),
                    volume.attached_machine_id.unwrap_or_default()
                );
            }
        }
        VolumeCommand::Show { app, id, api } => {
            let volume: Volume = api
                .client()?
                .get(&format!("/v1/apps/{app}/volumes/{id}"))
                .await?;
            print_json(&volume)?;
        }
        VolumeCommand::Extend {
            app,
            id,
            size_gb,
            api,
        } => {
            let answer: serde_json::Value = api
                .client()?
                .put(
                    &format!("/v1/apps/{app}/volumes/{id}/extend"),
                    &ExtendVolumeRequest { size_gb },
                )
                .await?;
            println!("volume {id} is {size_gb} GB");
            if answer["needs_restart"] == serde_json::Value::Bool(true) {
                println!("restart its Machine to see the new size");
            }
        }
        VolumeCommand::Snapshot { app, id, api } => {
            let snapshot: VolumeSnapshot = api
                .client()?
                .post(
                    &format!("/v1/apps/{app}/volumes/{id}/snapshots"),
                    &serde_json::json!({}),
                )
                .await?;
            println!("{}", snapshot.id);
        }
        VolumeCommand::Snapshots { app, id, json, api } => {
            let snapshots: Vec<VolumeSnapshot> = api
                .client()?
                .get(&format!("/v1/apps/{app}/volumes/{id}/snapshots"))
                .await?;
            if json {
                return print_json(&snapshots);
            }
            println!("{:<28} {:<10} {:>12} CREATED", "ID", "STATUS", "BYTES");
            for snapshot in snapshots {
                println!(
                    "{:<28} {:<10} {:>12} {}",
                    snapshot.id, snapshot.status, snapshot.size, snapshot.created_at
                );
            }
        }
        VolumeCommand::Delete {
            app,
            id,
            lose_state,
            api,
        } => {
            let _: Volume = api
                .client()?
                .delete(&format!(
                    "/v1/apps/{app}/volumes/{id}?lose_state={lose_state}"
                ))
                .await?;
            println!("deleted volume {id}");
        }
    }
    Ok(())
}
