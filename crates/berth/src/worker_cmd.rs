//! `berth worker`: the cluster's workers, their cordons and drains (admin).

use std::time::Duration;

use anyhow::{bail, Result};
use berth_api::{DrainState, Worker};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use crate::commands::print_json;
use crate::ApiArgs;

#[derive(Debug, Subcommand)]
pub enum WorkerCommand {
    /// Every worker, with what it holds and its last drain.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// One worker, with its drain's progress.
    Get {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Place no new Machines on the worker.
    Cordon {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Place Machines on the worker again.
    Uncordon {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Cordon the worker and move every Machine it holds to the others.
    Drain {
        name: String,
        /// Show the drain's progress and return when it ends; exits non-zero when some
        /// Machine could not move.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn worker(command: WorkerCommand) -> Result<()> {
    match command {
        WorkerCommand::List { json, api } => {
            let workers: Vec<Worker> = api.client()?.get("/v1/workers").await?;
            if json {
                return print_json(&workers);
            }
            for worker in workers {
                println!(
                    "{}\t{:?}\t{}\t{} machines ({} running){}",
                    worker.name,
                    worker.status,
                    if worker.cordoned { "cordoned" } else { "open" },
                    worker.machines,
                    worker.running,
                    worker
                        .drain
                        .map(|drain| format!("\tdrain {:?}", drain.state))
                        .unwrap_or_default()
                );
            }
        }
        WorkerCommand::Get { name, api } => {
            let worker: Worker = api.client()?.get(&format!("/v1/workers/{name}")).await?;
            print_json(&worker)?;
        }
        WorkerCommand::Cordon { name, api } => {
            let _: Worker = api
                .client()?
                .post(
                    &format!("/v1/workers/{name}/cordon"),
                    &serde_json::json!({}),
                )
                .await?;
            println!("worker {name} is cordoned");
        }
        WorkerCommand::Uncordon { name, api } => {
            let _: Worker = api
                .client()?
                .post(
                    &format!("/v1/workers/{name}/uncordon"),
                    &serde_json::json!({}),
                )
                .await?;
            println!("worker {name} is uncordoned");
        }
        WorkerCommand::Drain { name, wait, api } => {
            let client = api.client()?;
            let started: Worker = client
                .post(&format!("/v1/workers/{name}/drain"), &serde_json::json!({}))
                .await?;
            let total = started.drain.as_ref().map_or(0, |drain| drain.total);
            if !wait {
                println!("draining worker {name}: {total} machines to move; `berth worker get {name}` shows the progress");
                return Ok(());
            }
            let bar = ProgressBar::new(total);
            bar.set_style(ProgressStyle::with_template(
                "{spinner} {bar:30} {pos}/{len} moved {msg} ({elapsed})",
            )?);
            let drain = loop {
                let worker: Worker = client.get(&format!("/v1/workers/{name}")).await?;
                let Some(drain) = worker.drain else {
                    bail!("worker {name} shows no drain");
                };
                // Volumes no Machine holds are counted once the Machines have moved.
                let volumes = &drain.volumes;
                bar.set_length(drain.total + volumes.total);
                bar.set_position(drain.moved + volumes.moved + drain.failed.len() as u64);
                bar.set_message(format!(
                    "{} moving, {} left, {} failed",
                    drain.moving + volumes.moving,
                    drain.left + volumes.left,
                    drain.failed.len()
                ));
                if drain.state != DrainState::Draining {
                    break drain;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            };
            bar.finish();
            for failure in &drain.failed {
                let what = match &failure.volume {
                    Some(volume) => format!("volume {volume}"),
                    None => format!("machine {}", failure.machine),
                };
                eprintln!(
                    "{what} (app {}) stays: {} ({})",
                    failure.app, failure.error, failure.message
                );
            }
            match drain.state {
                DrainState::Drained => println!("worker {name} holds no machine and no volume"),
                _ => bail!(
                    "worker {name} still holds machines or volumes: {} could not move",
                    drain.failed.len()
                ),
            }
        }
    }
    Ok(())
}
