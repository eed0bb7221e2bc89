//! The CLI for orgs, tokens, and what programs do to Machines besides the lifecycle:
//! exec, logs -f, wait, events, metadata and leases.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{bail, Context, Result};
use berth::client::{is_api_error, Client};
use berth_api::{
    ApiDuration, CreateOrgRequest, CreateTokenRequest, ExecRequest, ExecResponse, ExpiresIn,
    LeaseRequest, LeaseResponse, ListAppsResponse, MachineEventAnswer, Org, QuotaOverrides,
    RateLimit, RateLimitOverrides, ReleaseLeaseResponse, SetMetadataRequest, SetOrgLimitsRequest,
    TokenCreated, TokenInfo, WaitResponse,
};
use clap::{Args, Subcommand};
use futures::StreamExt;

use crate::commands::print_json;
use crate::ApiArgs;

/// Ends `berth` with this status, without an error message.
#[derive(Debug)]
pub struct ExitWith(pub i32);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

/// The quota and rate-limit flags of `org create` and `org limits`.
#[derive(Debug, Args)]
pub struct LimitArgs {
    #[arg(long)]
    max_machines: Option<u64>,
    #[arg(long)]
    max_started_machines: Option<u64>,
    #[arg(long)]
    max_cpus: Option<u64>,
    #[arg(long)]
    max_memory_mb: Option<u64>,
    /// Unpacked size of the image layers the org's Machines use, in MiB.
    #[arg(long)]
    max_image_storage_mb: Option<u64>,
    /// Volumes the org may have at once.
    #[arg(long)]
    max_volumes: Option<u64>,
    /// Sum of the org's volume sizes, in GB.
    #[arg(long)]
    max_volume_gb: Option<u64>,
    /// A rate limit, ACTION=PER_SECOND/BURST (actions: create, start, stop, update,
    /// destroy, exec, read); may be repeated.
    #[arg(long = "rate", value_name = "ACTION=PER_SECOND/BURST")]
    rates: Vec<String>,
}

impl LimitArgs {
    fn into_request(self) -> Result<SetOrgLimitsRequest> {
        let mut rate_limits = RateLimitOverrides::default();
        for entry in &self.rates {
            let Some((action, rest)) = entry.split_once('=') else {
                bail!("--rate takes ACTION=PER_SECOND/BURST, got {entry:?}");
            };
            let Some((per_second, burst)) = rest.split_once('/') else {
                bail!("--rate takes ACTION=PER_SECOND/BURST, got {entry:?}");
            };
            let limit = RateLimit {
                per_second: per_second.parse().context("the rate per second")?,
                burst: burst.parse().context("the burst")?,
            };
            let slot = match action {
                "create" => &mut rate_limits.create,
                "start" => &mut rate_limits.start,
                "stop" => &mut rate_limits.stop,
                "update" => &mut rate_limits.update,
                "destroy" => &mut rate_limits.destroy,
                "exec" => &mut rate_limits.exec,
                "read" => &mut rate_limits.read,
                other => bail!("unknown action {other:?} in --rate"),
            };
            *slot = Some(limit);
        }
        Ok(SetOrgLimitsRequest {
            quotas: QuotaOverrides {
                max_machines: self.max_machines,
                max_started_machines: self.max_started_machines,
                max_cpus: self.max_cpus,
                max_memory_mb: self.max_memory_mb,
                max_image_storage_mb: self.max_image_storage_mb,
                max_volumes: self.max_volumes,
                max_volume_gb: self.max_volume_gb,
            },
            rate_limits,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an org.
    Create {
        slug: String,
        /// A display name (default: the slug).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List orgs with their limits and use.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one org as JSON.
    Show {
        slug: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Replace the org's quotas and rate limits (unset ones use the server's defaults).
    Limits {
        slug: String,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token for an org; it is printed once.
    Create {
        #[arg(long)]
        org: String,
        #[arg(long)]
        name: String,
        /// e.g. 3600, 12h, 30d
        #[arg(long)]
        expires_in: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List tokens (never their secrets).
    List {
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Revoke a token by id.
    Revoke {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn org(command: OrgCommand) -> Result<()> {
    match command {
        OrgCommand::Create {
            slug,
            name,
            limits,
            api,
        } => {
            let limits = limits.into_request()?;
            let org: Org = api
                .client()?
                .post(
                    "/v1/orgs",
                    &CreateOrgRequest {
                        slug,
                        name,
                        quotas: limits.quotas,
                        rate_limits: limits.rate_limits,
                    },
                )
                .await?;
            println!("created org {}", org.slug);
        }
        OrgCommand::List { json, api } => {
            let orgs: Vec<Org> = api.client()?.get("/v1/orgs").await?;
            if json {
                return print_json(&orgs);
            }
            println!(
                "{:<24} {:>9} {:>8} {:>6} {:>9}",
                "SLUG", "MACHINES", "STARTED", "CPUS", "MEMORY"
            );
            for org in orgs {
                println!(
                    "{:<24} {:>4}/{:<4} {:>3}/{:<4} {:>2}/{:<3} {:>4}/{}",
                    org.slug,
                    org.usage.machines,
                    org.limits.quotas.max_machines,
                    org.usage.started_machines,
                    org.limits.quotas.max_started_machines,
                    org.usage.cpus,
                    org.limits.quotas.max_cpus,
                    org.usage.memory_mb,
                    org.limits.quotas.max_memory_mb
                );
            }
        }
        OrgCommand::Show { slug, api } => {
            let org: Org = api.client()?.get(&format!("/v1/orgs/{slug}")).await?;
            print_json(&org)?;
        }
        OrgCommand::Limits { slug, limits, api } => {
            let org: Org = api
                .client()?
                .put(&format!("/v1/orgs/{slug}/limits"), &limits.into_request()?)
                .await?;
            print_json(&org.limits)?;
        }
    }
    Ok(())
}

pub async fn token(command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Create {
            org,
            name,
            expires_in,
            json,
            api,
        } => {
            let expires_in = expires_in
                .map(|text| ExpiresIn::parse(&text).map_err(anyhow::Error::msg))
                .transpose()?;
            let created: TokenCreated = api
                .client()?
                .post(
                    "/v1/tokens",
                    &CreateTokenRequest {
                        org_slug: org,
                        name,
                        expires_in,
                    },
                )
                .await?;
            if json {
                return print_json(&created);
            }
            println!("{}", created.token);
            eprintln!(
                "token {} for org {} (shown once; only its hash is kept)",
                created.info.id, created.info.org_slug
            );
        }
        TokenCommand::List { org, json, api } => {
            let path = match org {
                Some(org) => format!("/v1/tokens?org_slug={org}"),
                None => "/v1/tokens".to_owned(),
            };
            let tokens: Vec<TokenInfo> = api.client()?.get(&path).await?;
            if json {
                return print_json(&tokens);
            }
            println!("{:<18} {:<20} {:<24} STATUS", "ID", "ORG", "NAME");
            for token in tokens {
                let status = match (&token.revoked_at, &token.expires_at) {
                    (Some(at), _) => format!("revoked {at}"),
                    (None, Some(at)) => format!("expires {at}"),
                    (None, None) => "active".to_owned(),
                };
                println!(
                    "{:<18} {:<20} {:<24} {status}",
                    token.id, token.org_slug, token.name
                );
            }
        }
        TokenCommand::Revoke { id, api } => {
            let token: TokenInfo = api.client()?.delete(&format!("/v1/tokens/{id}")).await?;
            println!("revoked token {} ({})", token.id, token.name);
        }
    }
    Ok(())
}

/// The Machine's app: the one given, or the app that holds the id.
pub async fn resolve_app(client: &Client, app: Option<String>, id: &str) -> Result<String> {
    if let Some(app) = app {
        return Ok(app);
    }
    let listed: ListAppsResponse = client.get("/v1/apps").await?;
    for app in listed.apps {
        let path = format!("/v1/apps/{}/machines/{id}", app.name);
        match client.get::<serde_json::Value>(&path).await {
            Ok(_) => return Ok(app.name),
            Err(error) if is_api_error(&error, "not_found") => continue,
            Err(error) => return Err(error),
        }
    }
    bail!("no machine {id} in any app you can see (pass --app)")
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The Machine's app; found by the Machine's id when not given.
    #[arg(long, env = "BERTH_APP")]
    app: Option<String>,
    id: String,
    /// Text fed to the command's stdin.
    #[arg(long)]
    stdin: Option<String>,
    /// e.g. 30s (default), at most 10m.
    #[arg(long)]
    timeout: Option<String>,
    /// Print the whole answer as JSON instead of the command's output.
    #[arg(long)]
    json: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
    #[command(flatten)]
    api: ApiArgs,
}

/// Prints the command's output and ends with its exit status, like `docker exec`.
pub async fn exec(args: ExecArgs) -> Result<()> {
    let client = args.api.client()?;
    let app = resolve_app(&client, args.app, &args.id).await?;
    let timeout = args
        .timeout
        .map(|text| ApiDuration::parse(&text).map_err(anyhow::Error::msg))
        .transpose()?;
    let answer: ExecResponse = client
        .post(
            &format!("/v1/apps/{app}/machines/{}/exec", args.id),
            &ExecRequest {
                cmd: args.cmd,
                stdin: args.stdin,
                timeout,
            },
        )
        .await?;
    if args.json {
        return print_json(&answer);
    }
    std::io::stdout()
        .lock()
        .write_all(answer.stdout.as_bytes())?;
    std::io::stderr()
        .lock()
        .write_all(answer.stderr.as_bytes())?;
    if answer.truncated {
        eprintln!("berth: the output was cut at the server's cap");
    }
    if answer.timed_out {
        eprintln!("berth: the command timed out and was killed");
        return Err(ExitWith(124).into());
    }
    match answer.exit_code {
        Some(0) => Ok(()),
        Some(code) => Err(ExitWith(code).into()),
        None => Err(ExitWith(1).into()),
    }
}

/// `berth machine logs`, once or following.
pub async fn logs(
    client: &Client,
    app: &str,
    id: &str,
    follow: bool,
    since: Option<u64>,
) -> Result<()> {
    let mut path = format!("/v1/apps/{app}/machines/{id}/logs?follow={follow}");
    if let Some(since) = since {
        path.push_str(&format!("&since={since}"));
    }
    let response = client.get_stream(&path).await?;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("reading the log stream")?;
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&chunk)?;
        stdout.flush()?;
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    #[arg(long, env = "BERTH_APP")]
    app: Option<String>,
    id: String,
    /// started, stopped, suspended, destroyed, failed or settled; repeat it to wait for
    /// whichever comes first.
    #[arg(long, default_value = "started")]
    state: Vec<String>,
    /// Seconds, at most 60.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Only this version of the Machine (its instance_id) counts.
    #[arg(long = "machine-version", alias = "instance-id")]
    version: Option<String>,
    #[command(flatten)]
    api: ApiArgs,
}

pub async fn wait(args: WaitArgs) -> Result<()> {
    let client = args.api.client()?;
    let app = resolve_app(&client, args.app, &args.id).await?;
    let mut path = format!(
        "/v1/apps/{app}/machines/{}/wait?timeout={}",
        args.id, args.timeout
    );
    for state in &args.state {
        path.push_str(&format!("&state={state}"));
    }
    if let Some(version) = args.version {
        path.push_str(&format!("&version={version}"));
    }
    let answer: WaitResponse = client.get(&path).await?;
    println!("{} is {}", args.id, answer.state);
    Ok(())
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    #[arg(long, env = "BERTH_APP")]
    app: Option<String>,
    id: String,
    /// Only events after this id.
    #[arg(long)]
    since: Option<i64>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    api: ApiArgs,
}

pub async fn events(args: EventsArgs) -> Result<()> {
    let client = args.api.client()?;
    let app = resolve_app(&client, args.app, &args.id).await?;
    let path = format!(
        "/v1/apps/{app}/machines/{}/events?since={}",
        args.id,
        args.since.unwrap_or(0)
    );
    let events: Vec<MachineEventAnswer> = client.get(&path).await?;
    if args.json {
        return print_json(&events);
    }
    println!(
        "{:>8} {:<26} {:<14} {:<15} {:<9} {:>5} REASON",
        "ID", "TIME", "TYPE", "SOURCE", "STATUS", "EXIT"
    );
    for event in events {
        println!(
            "{:>8} {:<26} {:<14} {:<15} {:<9} {:>5} {}",
            event.id,
            format_ms(event.timestamp),
            event.kind.fly_type(),
            event.source,
            event.status,
            event
                .exit_code
                .map(|code| code.to_string())
                .unwrap_or_default(),
            event.reason.unwrap_or_default()
        );
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum MetadataCommand {
    /// Print the Machine's metadata as JSON.
    Get {
        #[arg(long, env = "BERTH_APP")]
        app: Option<String>,
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Set one key.
    Set {
        #[arg(long, env = "BERTH_APP")]
        app: Option<String>,
        id: String,
        key: String,
        value: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove one key.
    Rm {
        #[arg(long, env = "BERTH_APP")]
        app: Option<String>,
        id: String,
        key: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn metadata(command: MetadataCommand) -> Result<()> {
    match command {
        MetadataCommand::Get { app, id, api } => {
            let client = api.client()?;
            let app = resolve_app(&client, app, &id).await?;
            let metadata: BTreeMap<String, String> = client
                .get(&format!("/v1/apps/{app}/machines/{id}/metadata"))
                .await?;
            print_json(&metadata)?;
        }
        MetadataCommand::Set {
            app,
            id,
            key,
            value,
            api,
        } => {
            let client = api.client()?;
            let app = resolve_app(&client, app, &id).await?;
            client
                .post::<_, serde_json::Value>(
                    &format!("/v1/apps/{app}/machines/{id}/metadata/{key}"),
                    &SetMetadataRequest { value },
                )
                .await?;
        }
        MetadataCommand::Rm { app, id, key, api } => {
            let client = api.client()?;
            let app = resolve_app(&client, app, &id).await?;
            client
                .delete::<serde_json::Value>(&format!(
                    "/v1/apps/{app}/machines/{id}/metadata/{key}"
                ))
                .await?;
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Take the lease (or refresh it, with --lease-nonce); prints the nonce.
    Acquire {
        #[arg(long, env = "BERTH_APP")]
        app: Option<String>,
        id: String,
        /// Seconds (default 30).
        #[arg(long)]
        ttl: Option<u64>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show the lease as JSON.
    Show {
        #[arg(long, env = "BERTH_APP")]
        app: Option<String>,
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Release the lease; needs --lease-nonce.
    Release {
        #[arg(long, env = "BERTH_APP")]
        app: Option<String>,
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

pub async fn lease(command: LeaseCommand) -> Result<()> {
    match command {
        LeaseCommand::Acquire {
            app,
            id,
            ttl,
            description,
            json,
            api,
        } => {
            let client = api.client()?;
            let app = resolve_app(&client, app, &id).await?;
            let lease: LeaseResponse = client
                .post(
                    &format!("/v1/apps/{app}/machines/{id}/lease"),
                    &LeaseRequest { ttl, description },
                )
                .await?;
            if json {
                return print_json(&lease);
            }
            println!("{}", lease.data.nonce);
            eprintln!(
                "leased until {} (Unix seconds; version {})",
                lease.data.expires_at, lease.data.version
            );
        }
        LeaseCommand::Show { app, id, api } => {
            let client = api.client()?;
            let app = resolve_app(&client, app, &id).await?;
            let lease: LeaseResponse = client
                .get(&format!("/v1/apps/{app}/machines/{id}/lease"))
                .await?;
            print_json(&lease)?;
        }
        LeaseCommand::Release { app, id, api } => {
            let client = api.client()?;
            let app = resolve_app(&client, app, &id).await?;
            client
                .delete::<ReleaseLeaseResponse>(&format!("/v1/apps/{app}/machines/{id}/lease"))
                .await?;
            println!("released the lease on {id}");
        }
    }
    Ok(())
}

/// RFC 3339 text of Unix milliseconds (an event's `timestamp`), for tables.
fn format_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|moment| {
            moment
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}
