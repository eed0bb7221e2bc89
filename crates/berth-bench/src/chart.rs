//! The PNG chart of start-latency distributions: one empirical CDF per series on a log
//! time axis, so a 3 ms floor and a 90 ms `podman run` read on one picture.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

/// Debian's fonts-dejavu-core; ab_glyph draws with it, so no fontconfig or freetype.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// One series: a label and its samples in milliseconds.
pub struct Series {
    pub label: String,
    pub ms: Vec<f64>,
}

const COLOURS: &[RGBColor] = &[
    RGBColor(213, 94, 0),
    RGBColor(0, 114, 178),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(230, 159, 0),
    RGBColor(100, 100, 100),
    RGBColor(0, 0, 0),
    RGBColor(150, 60, 200),
];

fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = FONT_PATHS
                .iter()
                .find_map(|path| std::fs::read(path).ok())
                .ok_or_else(|| {
                    "no DejaVuSans.ttf found: apt-get install fonts-dejavu-core".to_owned()
                })?;
            // plotters keeps fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| "DejaVuSans.ttf is not a usable font".to_owned())
        })
        .clone()
        .map_err(|message| anyhow!(message))
}

/// The points of a step ECDF: for each sorted sample, the fraction of samples at or
/// below it, in percent.
pub fn ecdf(sorted_ms: &[f64]) -> Vec<(f64, f64)> {
    let n = sorted_ms.len() as f64;
    sorted_ms
        .iter()
        .enumerate()
        .flat_map(|(index, &x)| {
            [
                (x, index as f64 / n * 100.0),
                (x, (index + 1) as f64 / n * 100.0),
            ]
        })
        .collect()
}

/// The time axis: a little below the fastest sample to a little above the slowest.
pub fn x_range(series: &[Series]) -> (f64, f64) {
    let all = series.iter().flat_map(|s| s.ms.iter().copied());
    let (min, max) = all.fold((f64::INFINITY, 0.0f64), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    if !min.is_finite() || max <= 0.0 {
        return (0.1, 1000.0);
    }
    ((min / 1.25).max(0.01), max * 1.25)
}

pub fn draw(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    register_font()?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let text = |e: &dyn std::fmt::Display| anyhow!("drawing the chart: {e}");
    let root = BitMapBackend::new(path, (1200, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| text(&e))?;
    let (lo, hi) = x_range(series);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..100f64)
        .map_err(|e| text(&e))?;
    chart
        .configure_mesh()
        .x_desc("start latency, ms (log scale)")
        .y_desc("% of starts at or below")
        .x_label_formatter(&|x| format!("{x:.1}"))
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(|e| text(&e))?;
    for (index, one) in series.iter().enumerate() {
        if one.ms.is_empty() {
            continue;
        }
        let colour = COLOURS[index % COLOURS.len()];
        let mut sorted = one.ms.clone();
        sorted.sort_by(f64::total_cmp);
        chart
            .draw_series(LineSeries::new(ecdf(&sorted), colour.stroke_width(3)))
            .map_err(|e| text(&e))?
            .label(one.label.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| text(&e))?;
    root.present()
        .map_err(|e| text(&e))
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdf_steps_up_to_one_hundred_percent() {
        let points = ecdf(&[1.0, 2.0, 4.0, 8.0]);
        assert_eq!(
            points,
            [
                (1.0, 0.0),
                (1.0, 25.0),
                (2.0, 25.0),
                (2.0, 50.0),
                (4.0, 50.0),
                (4.0, 75.0),
                (8.0, 75.0),
                (8.0, 100.0)
            ]
        );
        assert!(ecdf(&[]).is_empty());
    }

    #[test]
    fn the_time_axis_holds_every_sample() {
        let series = [
            Series {
                label: "a".into(),
                ms: vec![2.0, 3.0],
            },
            Series {
                label: "b".into(),
                ms: vec![80.0],
            },
        ];
        assert_eq!(x_range(&series), (1.6, 100.0));
        assert_eq!(x_range(&[]), (0.1, 1000.0));
    }

    #[test]
    fn draws_a_png_when_the_font_is_there() {
        if FONT_PATHS.iter().all(|path| !Path::new(path).is_file()) {
            // Without fonts-dejavu-core the bench skips its chart and says why.
            assert!(register_font().is_err());
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        let series = [Series {
            label: "berth start".into(),
            ms: vec![3.0, 4.0, 5.0, 9.0],
        }];
        draw(&path, "start latency", &series).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    }
}
