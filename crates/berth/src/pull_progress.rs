//! `berth image pull`: NDJSON progress from the API drawn as indicatif bars, one per
//! layer (bytes, rate), under a line counting finished layers.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use berth::client::Client;
use berth_api::ImagePullEvent;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.get(..12).unwrap_or(hex)
}

pub async fn pull(client: &Client, reference: &str) -> Result<ImagePullEvent> {
    let bars = MultiProgress::new();
    let summary = bars.add(ProgressBar::new(0));
    summary.set_style(
        ProgressStyle::with_template("{prefix} {pos}/{len} layers {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    summary.set_prefix(reference.to_owned());
    let layer_style = ProgressStyle::with_template(
        "  {prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut layers: HashMap<String, ProgressBar> = HashMap::new();
    let result = client
        .pull_image(reference, |event| {
            let Some(layer) = &event.layer else {
                if event.status == "resolved" {
                    summary.set_message(event.digest.clone().unwrap_or_default());
                }
                return;
            };
            let bar = layers.entry(layer.clone()).or_insert_with(|| {
                summary.inc_length(1);
                let bar = bars.add(ProgressBar::new(event.bytes_total));
                bar.set_style(layer_style.clone());
                bar.set_prefix(short(layer).to_owned());
                bar.enable_steady_tick(Duration::from_millis(200));
                bar
            });
            bar.set_position(event.bytes_done);
            match event.status.as_str() {
                "exists" => {
                    bar.finish_with_message("already stored");
                    summary.inc(1);
                }
                "unpacked" => {
                    if !bar.is_finished() {
                        bar.finish_with_message("done");
                        summary.inc(1);
                    }
                }
                other => bar.set_message(other.to_owned()),
            }
        })
        .await;
    for bar in layers.values() {
        if !bar.is_finished() {
            bar.abandon();
        }
    }
    summary.finish();
    result
}
