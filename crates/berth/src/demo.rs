//! `berth up --demo`: imports a busybox image, creates a Machine that serves HTTP, cycles
//! it through stop and start, and shows the timings and the page it serves.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_agent::Agent;
use berth_api::{
    App, CreateAppRequest, CreateMachineRequest, Machine, MachineConfig, MachineState,
    StartStopResponse,
};
use berth_image::build::{busybox_layer, Compression, ImageBuilder};

use berth::client::{is_api_error, Client};

pub const DEMO_APP: &str = "demo";
pub const DEMO_IMAGE: &str = "demo/busybox:1";
const DEMO_MACHINE: &str = "web";
const BUSYBOX: &str = "/bin/busybox";
const START_CYCLES: usize = 10;

/// The Machine's command: count its boots in its own disk, then serve a page about it.
/// As PID 1 the shell must handle SIGTERM itself, or stop waits for the SIGKILL timeout:
/// the trap comes first, and the boot is counted only once it is set.
const SERVE_SCRIPT: &str = r#"trap 'kill $server; exit 0' TERM
mkdir -p /www /data
echo boot >> /data/boots
echo "<h1>Hello from Berth machine $(hostname)</h1><p>boot number $(wc -l < /data/boots)</p>" > /www/index.html
echo "serving on :8080 (boot $(wc -l < /data/boots))"
httpd -f -p 8080 -h /www & server=$!
wait $server"#;
/// How long the demo waits for a boot to be counted before it stops the Machine anyway.
const BOOT_WAIT: Duration = Duration::from_secs(5);

/// Boots counted in the Machine's `/data/boots`, read from its upperdir on the host.
fn boots_counted(file: &Path) -> usize {
    std::fs::read_to_string(file).map_or(0, |text| text.lines().count())
}

/// Waits until the Machine has counted a boot beyond `seen` (its SIGTERM trap is set by
/// then, so the next stop is a graceful one); answers the new count.
async fn wait_for_boot(file: &Path, seen: usize) -> usize {
    let deadline = Instant::now() + BOOT_WAIT;
    loop {
        let now = boots_counted(file);
        if now > seen || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

pub async fn run(api_url: &str, token: &str, agent: &Agent) -> Result<()> {
    let client = Client::new(api_url, token)?;

    let archive = tempfile::NamedTempFile::new()?;
    let archive_path = archive.path().to_owned();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let layer = busybox_layer(Path::new(BUSYBOX))
            .context("building the busybox layer (is busybox-static installed?)")?;
        ImageBuilder::new()
            .layer(layer, Compression::Gzip)
            .cmd(&["/bin/sh"])
            .write_archive(&archive_path)?;
        Ok(())
    })
    .await??;
    let clock = Instant::now();
    let image = crate::commands::import(&client, archive.path(), DEMO_IMAGE).await?;
    println!(
        "demo: imported {} ({}) in {:.1} ms",
        image.name,
        image.digest,
        ms(clock.elapsed())
    );

    let created_app: Result<App> = client
        .post(
            "/v1/apps",
            &CreateAppRequest {
                app_name: DEMO_APP.into(),
                org_slug: None,
            },
        )
        .await;
    match created_app {
        Ok(_) => {}
        Err(error) if is_api_error(&error, "already_exists") => {}
        Err(error) => return Err(error),
    }

    let machines: Vec<Machine> = client.get(&format!("/v1/apps/{DEMO_APP}/machines")).await?;
    let machine = match machines
        .into_iter()
        .find(|machine| machine.name == DEMO_MACHINE)
    {
        Some(machine) => {
            println!(
                "demo: machine {} already exists ({}); its disk is kept",
                machine.id, machine.state
            );
            machine
        }
        None => {
            let request = CreateMachineRequest {
                from_checkpoint: None,
                name: Some(DEMO_MACHINE.into()),
                region: None,
                skip_launch: false,
                skip_secrets: false,
                min_secrets_version: None,
                lease_ttl: None,
                config: MachineConfig {
                    image: DEMO_IMAGE.into(),
                    init: berth_api::InitConfig {
                        cmd: Some(vec!["/bin/sh".into(), "-c".into(), SERVE_SCRIPT.into()]),
                        entrypoint: None,
                        exec: None,
                        tty: false,
                    },
                    ..MachineConfig::default()
                },
            };
            let clock = Instant::now();
            let machine: Machine = client
                .post(&format!("/v1/apps/{DEMO_APP}/machines"), &request)
                .await?;
            println!(
                "demo: created machine {} and started it in {:.1} ms (create, once)",
                machine.id,
                ms(clock.elapsed())
            );
            machine
        }
    };
    let base = format!("/v1/apps/{DEMO_APP}/machines/{}", machine.id);
    let boots_file = agent.layout(&machine.id).upper().join("data/boots");
    let mut boots = wait_for_boot(&boots_file, 0).await;

    let mut starts = Vec::with_capacity(START_CYCLES);
    for _ in 0..START_CYCLES {
        let _: StartStopResponse = client
            .post(&format!("{base}/stop"), &serde_json::json!({}))
            .await?;
        let clock = Instant::now();
        let answer: StartStopResponse = client
            .post(&format!("{base}/start"), &serde_json::json!({}))
            .await?;
        starts.push(clock.elapsed());
        boots = wait_for_boot(&boots_file, boots).await;
        if answer.machine.state != MachineState::Started {
            bail!(
                "machine {} did not start: {:?}",
                machine.id,
                answer.machine.state
            );
        }
    }
    starts.sort();
    println!(
        "demo: {START_CYCLES} stop→start cycles: start p50 {:.1} ms, min {:.1} ms, max {:.1} ms (through the HTTP API, until init runs)",
        ms(starts[START_CYCLES / 2]),
        ms(starts[0]),
        ms(starts[START_CYCLES - 1])
    );

    let netns = agent.layout(&machine.id).netns();
    let page = tokio::task::spawn_blocking(move || fetch_page(&netns)).await??;
    println!(
        "demo: GET http://127.0.0.1:8080/ inside the machine's network namespace:\n  {}",
        page.trim()
    );
    println!(
        "demo: try `berth machine logs --app {DEMO_APP} {}`",
        machine.id
    );
    Ok(())
}

/// Fetches `/` from the Machine's HTTP server through its own network namespace.
fn fetch_page(netns: &Path) -> Result<String> {
    let address: SocketAddr = "127.0.0.1:8080".parse()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match get_once(netns, address) {
            Ok(page) => return Ok(page),
            // The server may still be starting right after start answered.
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(error) => {
                return Err(error).context("fetching / from the demo machine's port 8080")
            }
        }
    }
}

fn get_once(netns: &Path, address: SocketAddr) -> Result<String> {
    let mut stream = berth_runtime::netns::connect_tcp(netns, address, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: demo\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        bail!("incomplete HTTP answer: {response:?}");
    };
    let status = head.lines().next().unwrap_or_default();
    Ok(format!("{status} {body}"))
}
