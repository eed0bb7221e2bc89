//! `berth machine checkpoint …` and `berth machine fork`: checkpoints of a Machine's files.

use anyhow::Result;
use berth_api::{Checkpoint, CreateCheckpointRequest, Machine, RestoreCheckpointResponse};
use clap::Subcommand;

use crate::commands::print_json;
use crate::ApiArgs;

#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// Take a checkpoint of the Machine's files (a running Machine runs on).
    Create {
        #[arg(long, env = "BERTH_APP")]
        app: String,
        id: String,
        #[arg(long, default_value = "")]
        comment: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The Machine's checkpoints, oldest first.
    List {
        #[arg(long, env = "BERTH_APP")]
        app: String,
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a checkpoint.
    Rm {
        #[arg(long, env = "BERTH_APP")]
        app: String,
        id: String,
        checkpoint: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Make the Machine's files those of a checkpoint (after a checkpoint that undoes it).
    Restore {
        #[arg(long, env = "BERTH_APP")]
        app: String,
        id: String,
        checkpoint: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn checkpoint(command: CheckpointCommand) -> Result<()> {
    match command {
        CheckpointCommand::Create {
            app,
            id,
            comment,
            json,
            api,
        } => {
            let checkpoint: Checkpoint = api
                .client()?
                .post(
                    &format!("/v1/apps/{app}/machines/{id}/checkpoints"),
                    &CreateCheckpointRequest { comment },
                )
                .await?;
            if json {
                return print_json(&checkpoint);
            }
            println!("{}", checkpoint.id);
        }
        CheckpointCommand::List { app, id, json, api } => {
            let checkpoints: Vec<Checkpoint> = api
                .client()?
                .get(&format!("/v1/apps/{app}/machines/{id}/checkpoints"))
                .await?;
            if json {
                return print_json(&checkpoints);
            }
            println!(
                "{:<20} {:<26} {:>12} {:<20} COMMENT",
                "ID", "CREATED", "SIZE", "PARENT"
            );
            for checkpoint in checkpoints {
                println!(
                    "{:<20} {:<26} {:>12} {:<20} {}{}",
                    checkpoint.id,
                    checkpoint.created_at,
                    checkpoint.size_bytes,
                    checkpoint.parent.as_deref().unwrap_or("-"),
                    if checkpoint.auto { "(auto) " } else { "" },
                    checkpoint.comment.replace(char::is_control, " ")
                );
            }
        }
        CheckpointCommand::Rm {
            app,
            id,
            checkpoint,
            api,
        } => {
            let _: serde_json::Value = api
                .client()?
                .delete(&format!(
                    "/v1/apps/{app}/machines/{id}/checkpoints/{checkpoint}"
                ))
                .await?;
            println!("deleted {checkpoint}");
        }
        CheckpointCommand::Restore {
            app,
            id,
            checkpoint,
            json,
            api,
        } => {
            let answer: RestoreCheckpointResponse = api
                .client()?
                .post(
                    &format!("/v1/apps/{app}/machines/{id}/checkpoints/{checkpoint}/restore"),
                    &serde_json::json!({}),
                )
                .await?;
            if json {
                return print_json(&answer);
            }
            println!(
                "restored {} on machine {}{}; undo with {}",
                answer.restored,
                answer.machine.id,
                if answer.restarted { " (restarted)" } else { "" },
                answer.undo.id
            );
        }
    }
    Ok(())
}

/// `berth machine fork`: a new Machine with a checkpoint of this one's files.
pub async fn fork(
    app: String,
    id: String,
    name: Option<String>,
    to_app: Option<String>,
    skip_launch: bool,
    api: ApiArgs,
) -> Result<()> {
    let mut body = serde_json::json!({"skip_launch": skip_launch});
    if let Some(name) = name {
        body["name"] = name.into();
    }
    if let Some(to_app) = to_app {
        body["app"] = to_app.into();
    }
    let machine: Machine = api
        .client()?
        .post(&format!("/v1/apps/{app}/machines/{id}/fork"), &body)
        .await?;
    println!("{}", machine.id);
    Ok(())
}
