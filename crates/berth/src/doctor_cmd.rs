//! `berth doctor [--repair]`: asks the API to check every worker's records against its
//! host, prints every finding, and exits non-zero when anything is found (with
//! `--repair`: when anything is left unrepaired) or when a worker could not be checked.

use anyhow::{bail, Result};
use berth_api::{DoctorReport, Worker};
use clap::Args;

use crate::robots::ExitWith;
use crate::ApiArgs;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Remove orphans and record Machines found dead as stopped. Never deletes the files
    /// of a Machine that exists.
    #[arg(long)]
    repair: bool,
    /// Check only this worker.
    #[arg(long)]
    worker: Option<String>,
    /// Print the reports as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    api: ApiArgs,
}

pub async fn run(args: DoctorArgs) -> Result<()> {
    let client = args.api.client()?;
    let workers: Vec<Worker> = client.get("/v1/workers").await?;
    let names: Vec<String> = match &args.worker {
        Some(name) => {
            if !workers.iter().any(|worker| &worker.name == name) {
                bail!("no worker named {name:?}");
            }
            vec![name.clone()]
        }
        None => workers.into_iter().map(|worker| worker.name).collect(),
    };
    let mut reports: Vec<DoctorReport> = Vec::new();
    // A worker that cannot be checked (down, busy) does not stop the others' checks.
    let mut unchecked = 0usize;
    for name in &names {
        let report: Result<DoctorReport> = if args.repair {
            client
                .post(
                    &format!("/v1/workers/{name}/doctor/repair"),
                    &serde_json::json!({}),
                )
                .await
        } else {
            client.get(&format!("/v1/workers/{name}/doctor")).await
        };
        match report {
            Ok(report) => reports.push(report),
            Err(error) => {
                unchecked += 1;
                eprintln!("worker {name}: not checked: {error:#}");
            }
        }
    }
    if args.json {
        crate::commands::print_json(&reports)?;
    } else {
        for report in &reports {
            print_report(report);
        }
    }
    let left: usize = reports
        .iter()
        .map(|report| report.unresolved().count())
        .sum();
    let found: usize = reports.iter().map(|report| report.findings.len()).sum();
    let failing = if args.repair { left } else { found };
    if failing > 0 || unchecked > 0 {
        return Err(ExitWith(1).into());
    }
    Ok(())
}

fn print_report(report: &DoctorReport) {
    let repaired = report
        .findings
        .iter()
        .filter(|finding| finding.repaired)
        .count();
    let verdict = if report.findings.is_empty() {
        "ok".to_owned()
    } else if report.repair {
        format!("{} finding(s), {repaired} repaired", report.findings.len())
    } else {
        format!("{} finding(s)", report.findings.len())
    };
    println!(
        "worker {}: {} machine(s) checked, {verdict}",
        report.worker, report.machines
    );
    if !report.busy.is_empty() {
        println!("  busy, not checked: {}", report.busy.join(", "));
    }
    for finding in &report.findings {
        let kind = serde_json::to_value(finding.kind)
            .ok()
            .and_then(|value| value.as_str().map(str::to_owned))
            .unwrap_or_default();
        let mark = if finding.repaired { " (repaired)" } else { "" };
        let machine = finding.machine_id.as_deref().unwrap_or("-");
        let object = finding
            .object
            .as_deref()
            .map(|object| format!(" [{object}]"))
            .unwrap_or_default();
        println!(
            "  {kind:<22} {machine:<16} {}{object}{mark}",
            finding.message
        );
    }
}
