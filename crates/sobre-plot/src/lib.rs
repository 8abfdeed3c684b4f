//! sobre-plot: the training curves of a run directory as one PNG — rewards per function,
//! accuracy (training rollouts and held-out eval), KL, completion length, entropy, clip
//! fraction, expert load imbalance and the SFT loss — as a grid of small panels with titles,
//! axis labels and legends, step on x.
//!
//! Pure Rust: plotters' bitmap backend draws into a buffer, text is rendered by `ab_glyph` with
//! DejaVu Sans embedded in the binary (no fontconfig, freetype or system fonts), and the `png`
//! crate encodes it. It is its own crate so that the trainer and its tests do not compile a
//! plotting stack only the `sobre plot` command needs.
//!
//! Not here: computing metrics (the trainer writes `metrics.jsonl`), interactive plots.
//!
//! ```no_run
//! let summary = sobre_plot::plot_run("runs/smoke".as_ref(), "runs/smoke/curves.png".as_ref(), &Default::default())?;
//! println!("{} panels", summary.panels.len());
//! # Ok::<(), sobre_plot::PlotError>(())
//! ```

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;
use serde_json::{Map, Value};

/// Why a plot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A line of `metrics.jsonl` that is not a JSON object (1-based line number).
    #[error("{}:{line}: {msg}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("drawing: {0}")]
    Draw(String),
}

/// Image size and title.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotOptions {
    pub width: u32,
    pub height: u32,
    /// Title above the grid (default: the run directory's name).
    pub title: Option<String>,
}

impl Default for PlotOptions {
    fn default() -> Self {
        PlotOptions {
            width: 1500,
            height: 1000,
            title: None,
        }
    }
}

/// One line of a panel.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    /// `(step, value)`, finite values only, in file order.
    pub points: Vec<(f64, f64)>,
}

/// One small chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    /// Fixed y range (fractions in [0, 1]); `None`: fitted to the data.
    pub y_range: Option<(f64, f64)>,
    pub series: Vec<Series>,
}

/// What [`plot_run`] drew.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotSummary {
    pub metrics_lines: usize,
    /// Titles of the panels drawn, in grid order (row by row).
    pub panels: Vec<String>,
    pub width: u32,
    pub height: u32,
    pub out: PathBuf,
}

/// Height of the title band above the grid, in pixels.
pub const TITLE_HEIGHT: u32 = 44;

/// Read `metrics.jsonl`: one JSON object per line; blank lines are skipped. A bad line is an
/// error naming its line number.
pub fn read_metrics(path: &Path) -> Result<Vec<Map<String, Value>>, PlotError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => out.push(m),
            Ok(other) => {
                return Err(PlotError::Line {
                    path: path.to_path_buf(),
                    line: i + 1,
                    msg: format!("expected a JSON object, found {}", kind(&other)),
                });
            }
            Err(e) => {
                return Err(PlotError::Line {
                    path: path.to_path_buf(),
                    line: i + 1,
                    msg: format!("not valid JSON: {e}"),
                });
            }
        }
    }
    Ok(out)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn value(m: &Map<String, Value>, key: &str) -> Option<f64> {
    m.get(key)?.as_f64().filter(|v| v.is_finite())
}

fn stage(m: &Map<String, Value>) -> &str {
    m.get("stage").and_then(Value::as_str).unwrap_or("grpo")
}

/// `(step, value)` of `keys` (the first present one per line) over the lines of `stages`.
fn points(lines: &[Map<String, Value>], stages: &[&str], keys: &[&str]) -> Vec<(f64, f64)> {
    lines
        .iter()
        .enumerate()
        .filter(|(_, m)| stages.contains(&stage(m)))
        .filter_map(|(i, m)| {
            let x = value(m, "step").unwrap_or((i + 1) as f64);
            keys.iter().find_map(|k| value(m, k)).map(|y| (x, y))
        })
        .collect()
}

/// The panels a run's metrics call for; series with no finite value, and panels with no
/// series, are left out (a missing metric is not drawn as zero).
pub fn panels(lines: &[Map<String, Value>]) -> Vec<Panel> {
    // GRPO lines, and any separate eval lines the trainer may write.
    const RL: &[&str] = &["grpo", "eval"];
    let series = |label: &str, stages: &[&str], keys: &[&str]| Series {
        label: label.to_string(),
        points: points(lines, stages, keys),
    };
    // Reward functions in first-seen order: `rewards/<name>/mean` (or `rewards/<name>`).
    let mut names: Vec<String> = Vec::new();
    for m in lines.iter().filter(|m| RL.contains(&stage(m))) {
        for k in m.keys() {
            let Some(rest) = k.strip_prefix("rewards/") else {
                continue;
            };
            let name = rest.strip_suffix("/mean").unwrap_or(rest);
            if !name.contains('/') && !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
    }
    let mut reward = vec![series("total (weighted)", RL, &["reward_mean"])];
    for n in &names {
        reward.push(series(
            n,
            RL,
            &[&format!("rewards/{n}/mean"), &format!("rewards/{n}")],
        ));
    }
    let step = "GRPO step";
    let all = vec![
        Panel {
            title: "Reward per function (mean)".into(),
            x_label: step.into(),
            y_range: None,
            series: reward,
        },
        Panel {
            title: "Accuracy".into(),
            x_label: step.into(),
            y_range: Some((0.0, 1.0)),
            series: vec![
                series("train rollouts", RL, &["accuracy"]),
                series("eval pass@1", RL, &["eval/pass@1", "eval_pass@1"]),
                series("eval pass@k", RL, &["eval/pass@k", "eval_pass@k"]),
                series("eval maj@k", RL, &["eval/maj@k", "eval_maj@k"]),
            ],
        },
        Panel {
            title: "KL to reference".into(),
            x_label: step.into(),
            y_range: None,
            series: vec![series("kl", RL, &["kl"])],
        },
        Panel {
            title: "Completion length (tokens)".into(),
            x_label: step.into(),
            y_range: None,
            series: vec![
                series("mean", RL, &["completion_length_mean"]),
                series("max", RL, &["completion_length_max"]),
                series("eval mean", RL, &["eval/mean_length"]),
            ],
        },
        Panel {
            title: "Entropy (nats/token)".into(),
            x_label: step.into(),
            y_range: None,
            series: vec![series("entropy", RL, &["entropy"])],
        },
        Panel {
            title: "Clip fraction".into(),
            x_label: step.into(),
            y_range: None,
            series: vec![
                series("total", RL, &["clip_fraction"]),
                series("low (ratio < 1-eps)", RL, &["clip_fraction_low"]),
                series("high (ratio > 1+eps)", RL, &["clip_fraction_high"]),
            ],
        },
        Panel {
            title: "Expert load imbalance (max/mean)".into(),
            x_label: step.into(),
            y_range: None,
            series: vec![series(
                "imbalance",
                RL,
                &["expert_imbalance", "expert_load_imbalance"],
            )],
        },
        Panel {
            title: "SFT loss".into(),
            x_label: "SFT step".into(),
            y_range: None,
            series: vec![series("loss", &["sft"], &["loss"])],
        },
    ];
    all.into_iter()
        .filter_map(|mut p| {
            p.series.retain(|s| !s.points.is_empty());
            (!p.series.is_empty()).then_some(p)
        })
        .collect()
}

/// Rows and columns of the grid for `n` panels.
pub fn grid(n: usize) -> (usize, usize) {
    let cols = match n {
        0..=1 => 1,
        2..=4 => 2,
        _ => 3,
    };
    (n.div_ceil(cols).max(1), cols)
}

/// Pixel rectangles `(x, y, w, h)` of `n` panels in a `width × height` image, row by row under
/// the title band.
pub fn panel_rects(n: usize, width: u32, height: u32) -> Vec<(u32, u32, u32, u32)> {
    let (rows, cols) = grid(n);
    let gh = height.saturating_sub(TITLE_HEIGHT);
    (0..n)
        .map(|i| {
            let (r, c) = ((i / cols) as u32, (i % cols) as u32);
            let x0 = c * width / cols as u32;
            let x1 = (c + 1) * width / cols as u32;
            let y0 = TITLE_HEIGHT + r * gh / rows as u32;
            let y1 = TITLE_HEIGHT + (r + 1) * gh / rows as u32;
            (x0, y0, x1 - x0, y1 - y0)
        })
        .collect()
}

/// Register the embedded DejaVu Sans as plotters' `sans-serif` (once per process).
fn fonts() -> Result<(), PlotError> {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_ok()
            && plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold())
                .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(PlotError::Draw("the embedded font did not load".into()))
    }
}

/// A tick label for `v` on an axis whose ticks are about `step` apart: enough decimals to tell
/// neighbouring ticks apart, scientific notation for very large or small magnitudes, and an
/// exact "0" for rounding noise around zero.
fn tick(v: f64, step: f64) -> String {
    let a = v.abs();
    if a <= step.abs() * 1e-6 {
        return "0".into();
    }
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}");
    }
    // plotters picks steps of 1, 2 or 5 × 10^e near the estimate; /2.5 covers the smaller ones.
    let dec = if step > 0.0 {
        (-(step / 2.5).log10()).ceil().clamp(0.0, 6.0) as usize
    } else {
        3
    };
    format!("{v:.dec$}")
}

fn span(lo: f64, hi: f64) -> (f64, f64) {
    if hi - lo > 1e-12 * hi.abs().max(1.0) {
        let pad = (hi - lo) * 0.06;
        (lo - pad, hi + pad)
    } else {
        let pad = (lo.abs() * 0.1).max(0.05);
        (lo - pad, hi + pad)
    }
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// The corner of the plot the legend hides fewest points in (upper left first on ties).
fn legend_corner(p: &Panel, (x0, x1): (f64, f64), (y0, y1): (f64, f64)) -> SeriesLabelPosition {
    // The legend box covers about this share of the plot near its corner.
    let (lw, lh) = (0.5, 0.12 + 0.08 * p.series.len() as f64);
    let corners = [
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let hidden = |right: bool, upper: bool| {
        p.series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|&&(x, y)| {
                let fx = (x - x0) / (x1 - x0);
                let fy = (y - y0) / (y1 - y0);
                (if right { fx >= 1.0 - lw } else { fx <= lw })
                    && (if upper { fy >= 1.0 - lh } else { fy <= lh })
            })
            .count()
    };
    let mut best = (usize::MAX, SeriesLabelPosition::UpperLeft);
    for (pos, right, upper) in corners {
        let n = hidden(right, upper);
        if n < best.0 {
            best = (n, pos);
        }
    }
    best.1
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_err<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError::Draw(format!("{e:?}"))
}

fn draw_panel(area: &Area<'_>, p: &Panel) -> Result<(), PlotError> {
    let pts = p.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let (x0, x1) = if x1 > x0 {
        (x0, x1)
    } else {
        (x0 - 1.0, x1 + 1.0)
    };
    let (y0, y1) = match p.y_range {
        // Fixed [0, 1] unless the data leave it.
        Some((lo, hi)) => span(lo.min(y0), hi.max(y1)),
        None => span(y0, y1),
    };
    let legend = legend_corner(p, (x0, x1), (y0, y1));
    // Integer steps get integer ticks only (no "1.5" on a 3-step axis).
    let x_ticks = ((x1 - x0).round() as usize + 1).clamp(2, 7);
    // Text and margins scale with the panel (500 × 320 pixels is 1:1), so small images stay
    // legible and titles fit.
    let (pw, ph) = area.dim_in_pixel();
    let k = (pw as f64 / 500.0).min(ph as f64 / 320.0).clamp(0.55, 1.6);
    let px = |v: f64| (v * k).round() as u32;
    let mut chart = ChartBuilder::on(area)
        .caption(
            &p.title,
            ("sans-serif", px(19.0)).into_font().style(FontStyle::Bold),
        )
        .margin(px(8.0))
        .margin_right(px(18.0))
        .x_label_area_size(px(40.0))
        .y_label_area_size(px(58.0))
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_labels(x_ticks)
        .y_labels(6)
        .x_label_formatter(&|v| {
            if (v - v.round()).abs() < 1e-9 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .y_label_formatter(&|v| tick(*v, (y1 - y0) / 6.0))
        .x_desc(p.x_label.as_str())
        .label_style(("sans-serif", px(13.0)))
        .axis_desc_style(("sans-serif", px(14.0)))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()
        .map_err(draw_err)?;
    for (i, s) in p.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        // Wide strokes are polygons with mitred joins in plotters, and the sharp zigzags of a
        // noisy per-step series turn their mitres into spikes far outside the panel: dense
        // series get 1-pixel lines.
        let width = if s.points.len() > 40 { 1 } else { 2 };
        let style = ShapeStyle::from(&color).stroke_width(width);
        let leg = px(18.0) as i32;
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), style))
            .map_err(draw_err)?
            .label(s.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + leg, y)], color.stroke_width(3))
            });
        // Markers where points are few or sparse (eval every N steps), so single points show.
        if s.points.len() <= 40 {
            chart
                .draw_series(
                    s.points
                        .iter()
                        .map(|&(x, y)| Circle::new((x, y), px(3.0).max(2), color.filled())),
                )
                .map_err(draw_err)?;
        }
    }
    if p.series.len() > 1 {
        chart
            .configure_series_labels()
            .position(legend)
            .background_style(WHITE.mix(0.75))
            .border_style(RGBColor(180, 180, 180))
            .label_font(("sans-serif", px(13.0)))
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

/// Draw `panels` as a grid into an RGB8 buffer of `width × height` (row-major).
pub fn render(
    panels: &[Panel],
    title: &str,
    width: u32,
    height: u32,
) -> Result<Vec<u8>, PlotError> {
    if !(300..=8000).contains(&width) || !(200..=8000).contains(&height) {
        return Err(PlotError::Invalid(format!(
            "image size {width}x{height} is out of range (300..8000 × 200..8000 pixels)"
        )));
    }
    fonts()?;
    let mut buf = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let style = ("sans-serif", 24)
            .into_font()
            .style(FontStyle::Bold)
            .color(&BLACK)
            .pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Center,
            ));
        root.draw_text(title, &style, (width as i32 / 2, TITLE_HEIGHT as i32 / 2))
            .map_err(draw_err)?;
        if panels.is_empty() {
            let msg = ("sans-serif", 20).into_font().color(&BLACK);
            root.draw_text("no plottable metrics", &msg, (20, TITLE_HEIGHT as i32 + 20))
                .map_err(draw_err)?;
        }
        for (p, (x, y, w, h)) in panels.iter().zip(panel_rects(panels.len(), width, height)) {
            let area = root.clone().shrink((x, y), (w, h));
            draw_panel(&area, p)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(buf)
}

/// Encode an RGB8 buffer as PNG at `path`.
pub fn write_png(path: &Path, rgb: &[u8], width: u32, height: u32) -> Result<(), PlotError> {
    let io = |source| PlotError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let file = std::fs::File::create(path).map_err(io)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let png_err = |e: png::EncodingError| PlotError::Draw(format!("{}: {e}", path.display()));
    let mut w = enc.write_header().map_err(png_err)?;
    w.write_image_data(rgb).map_err(png_err)?;
    w.finish().map_err(png_err)?;
    Ok(())
}

/// Plot `RUN_DIR/metrics.jsonl` (or a metrics file given directly) into the PNG `out`.
pub fn plot_run(run: &Path, out: &Path, opts: &PlotOptions) -> Result<PlotSummary, PlotError> {
    let metrics = if run.is_dir() {
        run.join("metrics.jsonl")
    } else {
        run.to_path_buf()
    };
    if !metrics.exists() {
        return Err(PlotError::Invalid(format!(
            "{} not found: expected a run directory written by `sobre train` (with metrics.jsonl) or a metrics.jsonl file",
            metrics.display()
        )));
    }
    let lines = read_metrics(&metrics)?;
    if lines.is_empty() {
        return Err(PlotError::Invalid(format!(
            "{} has no metrics lines yet",
            metrics.display()
        )));
    }
    let ps = panels(&lines);
    if ps.is_empty() {
        return Err(PlotError::Invalid(format!(
            "{}: none of the plotted metrics (reward_mean, rewards/<name>/mean, accuracy, eval/pass@1, kl, completion_length_mean, entropy, clip_fraction, expert_imbalance, loss) has a numeric value",
            metrics.display()
        )));
    }
    let title = opts.title.clone().unwrap_or_else(|| {
        let dir = if run.is_dir() {
            run
        } else {
            run.parent().unwrap_or(run)
        };
        let name = std::fs::canonicalize(dir)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string());
        format!("sobre run: {name}")
    });
    let rgb = render(&ps, &title, opts.width, opts.height)?;
    write_png(out, &rgb, opts.width, opts.height)?;
    Ok(PlotSummary {
        metrics_lines: lines.len(),
        panels: ps.into_iter().map(|p| p.title).collect(),
        width: opts.width,
        height: opts.height,
        out: out.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn missing_series_are_skipped_not_zero() {
        let lines = vec![
            obj(serde_json::json!({"stage": "sft", "step": 1, "loss": 2.0})),
            obj(
                serde_json::json!({"stage": "grpo", "step": 1, "reward_mean": 0.1, "rewards/format/mean": 0.0, "kl": null}),
            ),
            obj(
                serde_json::json!({"stage": "grpo", "step": 2, "reward_mean": 0.3, "rewards/format/mean": 0.5, "eval_pass@1": 0.25}),
            ),
        ];
        let ps = panels(&lines);
        let titles: Vec<&str> = ps.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(
            titles,
            ["Reward per function (mean)", "Accuracy", "SFT loss"]
        );
        assert_eq!(ps[0].series.len(), 2);
        assert_eq!(ps[0].series[1].label, "format");
        assert_eq!(ps[1].series[0].label, "eval pass@1");
        assert_eq!(ps[1].series[0].points, vec![(2.0, 0.25)]);
    }

    #[test]
    fn grid_and_rects() {
        assert_eq!(grid(1), (1, 1));
        assert_eq!(grid(4), (2, 2));
        assert_eq!(grid(7), (3, 3));
        let r = panel_rects(4, 1000, 844);
        assert_eq!(r[0], (0, TITLE_HEIGHT, 500, 400));
        assert_eq!(r[3], (500, TITLE_HEIGHT + 400, 500, 400));
    }

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(0.0, 0.2), "0");
        assert_eq!(tick(6.9e-18, 0.02), "0");
        assert_eq!(tick(0.4, 0.2), "0.40");
        assert_eq!(tick(22.5, 0.5), "22.5");
        assert_eq!(tick(120.0, 20.0), "120");
        assert_eq!(tick(6.1712, 0.001), "6.1712");
        assert_eq!(tick(0.0001, 0.00002), "1.0e-4");
    }
}
