//! `berth usage`: what an org was billed for, from the usage API.

use anyhow::Result;
use berth_api::UsageReport;
use clap::Args;

use crate::ApiArgs;

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// The org (default: personal).
    #[arg(long, default_value = "personal")]
    org: String,
    /// Start of the window: RFC 3339, YYYY-MM-DD or epoch ms (default: 30 days before --to).
    #[arg(long)]
    from: Option<String>,
    /// End of the window (default: now).
    #[arg(long)]
    to: Option<String>,
    /// Group rows by machine, app or day.
    #[arg(long = "by", default_value = "machine", value_parser = ["machine", "app", "day"])]
    by: String,
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    #[arg(long)]
    csv: bool,
    #[command(flatten)]
    api: ApiArgs,
}

pub async fn run(args: UsageArgs) -> Result<()> {
    let client = args.api.client()?;
    let mut query = vec![("group_by", args.by.clone())];
    query.extend(args.from.map(|from| ("from", from)));
    query.extend(args.to.map(|to| ("to", to)));
    let encoded: Vec<String> = query
        .iter()
        .map(|(key, value)| format!("{key}={}", crate::commands::encode_query(value)))
        .collect();
    let path = format!("/v1/orgs/{}/usage?{}", args.org, encoded.join("&"));
    if args.csv {
        let bytes = client.get_with_accept(&path, "text/csv").await?;
        print!("{}", String::from_utf8_lossy(&bytes));
        return Ok(());
    }
    let report: UsageReport = client.get(&path).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "usage of org {} from {} to {}",
        report.org, report.from, report.to
    );
    println!(
        "{:<24} {:>14} {:>14} {:>16} {:>16} {:>12}",
        args.by.to_uppercase(),
        "RUNNING_S",
        "CPU_S",
        "MEMORY_GB_S",
        "STORAGE_GB_H",
        "COST"
    );
    for row in report.rows.iter().chain(std::iter::once(&report.total)) {
        let key = row
            .machine
            .as_deref()
            .or(row.volume.as_deref())
            .or(row.app.as_deref())
            .or(row.day.as_deref())
            .unwrap_or("TOTAL");
        println!(
            "{key:<24} {:>14.3} {:>14.3} {:>16.3} {:>16.6} {:>12.6}",
            row.running_seconds,
            row.cpu_seconds,
            row.memory_gb_seconds,
            row.storage_gb_hours,
            row.cost
        );
    }
    Ok(())
}
