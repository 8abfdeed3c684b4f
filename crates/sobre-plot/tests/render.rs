//! A synthetic run's metrics → a PNG of the requested size with ink in every panel; bad input
//! gives clear errors.

use std::path::Path;

use sobre_plot::{PlotOptions, panel_rects, plot_run};

/// A metrics.jsonl shaped like the trainer's: 3 SFT lines, 30 GRPO lines, eval every 10.
fn synthetic_run(dir: &Path) {
    let mut text = String::new();
    for s in 1..=3 {
        text.push_str(&format!(
            "{{\"stage\":\"sft\",\"step\":{s},\"loss\":{},\"expert_imbalance\":1.4}}\n",
            3.0 / s as f64
        ));
    }
    for s in 1..=30 {
        let t = s as f64 / 30.0;
        let mut line = format!(
            "{{\"stage\":\"grpo\",\"step\":{s},\"reward_mean\":{r},\"rewards/countdown/mean\":{c},\"rewards/format/mean\":{f},\"accuracy\":{a},\"kl\":{kl},\"completion_length_mean\":{len},\"completion_length_max\":{lmax},\"entropy\":{ent},\"clip_fraction\":{cf},\"clip_fraction_low\":{cl},\"clip_fraction_high\":{ch},\"expert_imbalance\":{imb},\"expert_load\":[[0.5,0.5]]",
            r = 0.1 + 0.6 * t,
            c = 0.1 + 0.5 * t,
            f = t,
            a = 0.4 * t,
            kl = 0.002 * s as f64,
            len = 20.0 + 10.0 * t,
            lmax = 24.0 + 8.0 * t,
            ent = 2.5 - t,
            cf = 0.02 + 0.01 * t,
            cl = 0.01,
            ch = 0.01 + 0.01 * t,
            imb = 1.6 - 0.3 * t,
        );
        if s % 10 == 0 {
            line.push_str(&format!(",\"eval_pass@1\":{}", 0.3 * t));
        }
        line.push_str("}\n");
        text.push_str(&line);
    }
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
}

fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

#[test]
fn synthetic_run_plots_every_panel() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic_run(tmp.path());
    let out = tmp.path().join("plots/curves.png");
    let opts = PlotOptions {
        width: 1200,
        height: 900,
        title: None,
    };
    let summary = plot_run(tmp.path(), &out, &opts).unwrap();
    assert_eq!(summary.metrics_lines, 33);
    assert_eq!(
        summary.panels,
        [
            "Reward per function (mean)",
            "Accuracy",
            "KL to reference",
            "Completion length (tokens)",
            "Entropy (nats/token)",
            "Clip fraction",
            "Expert load imbalance (max/mean)",
            "SFT loss"
        ]
    );
    let (w, h, rgb) = decode(&out);
    assert_eq!((w, h), (1200, 900));
    // Every panel has ink: dark pixels (text, axes) and coloured pixels (the series).
    for (i, (x0, y0, pw, ph)) in panel_rects(summary.panels.len(), w, h)
        .into_iter()
        .enumerate()
    {
        let (mut dark, mut colour) = (0, 0);
        for y in y0..y0 + ph {
            for x in x0..x0 + pw {
                let p = ((y * w + x) * 3) as usize;
                let (r, g, b) = (rgb[p] as i32, rgb[p + 1] as i32, rgb[p + 2] as i32);
                if r + g + b < 200 {
                    dark += 1;
                }
                if (r - g).abs() + (g - b).abs() + (r - b).abs() > 120 {
                    colour += 1;
                }
            }
        }
        assert!(
            dark > 500,
            "panel {i} has no text or axes ({dark} dark pixels)"
        );
        assert!(
            colour > 100,
            "panel {i} has no series ({colour} coloured pixels)"
        );
    }
    if let Ok(dir) = std::env::var("SOBRE_PLOT_OUT") {
        std::fs::copy(&out, Path::new(&dir).join("synthetic.png")).unwrap();
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.png");
    let e = plot_run(tmp.path(), &out, &PlotOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("metrics.jsonl not found"), "{e}");
    std::fs::write(
        tmp.path().join("metrics.jsonl"),
        "{\"step\":1,\"kl\":0.1}\n\n{\"step\":2,\"kl\":\n",
    )
    .unwrap();
    let e = plot_run(tmp.path(), &out, &PlotOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("metrics.jsonl:3: not valid JSON"), "{e}");
    std::fs::write(tmp.path().join("metrics.jsonl"), "{\"step\":1}\n[1]\n").unwrap();
    let e = plot_run(tmp.path(), &out, &PlotOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("metrics.jsonl:2: expected a JSON object, found an array"),
        "{e}"
    );
    std::fs::write(
        tmp.path().join("metrics.jsonl"),
        "{\"step\":1,\"kl\":null}\n",
    )
    .unwrap();
    let e = plot_run(tmp.path(), &out, &PlotOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("none of the plotted metrics"), "{e}");
    assert!(!out.exists());
}

/// A noisy per-step series (sharp zigzags, as `completion_length_max` is in a real run) stays
/// inside its panel: wide strokes with mitred joins drew spikes up to the image's top edge.
#[test]
fn noisy_series_do_not_draw_outside_their_panel() {
    let mut lines = Vec::new();
    for s in 1..=500u64 {
        // Mostly 43–44, a jump to 64 every 7–13 steps: the shape that produced the spikes.
        let v = if s % 11 == 0 || s % 7 == 0 {
            64.0
        } else {
            43.0 + (s % 2) as f64
        };
        let line = serde_json::json!({"stage": "grpo", "step": s, "completion_length_max": v, "completion_length_mean": 38.0 + (s % 3) as f64});
        lines.push(line.as_object().unwrap().clone());
    }
    let panels = sobre_plot::panels(&lines);
    assert_eq!(panels.len(), 1);
    for (w, h) in [(300u32, 200u32), (500, 320), (900, 600)] {
        let rgb = sobre_plot::render(&panels, "", w, h).unwrap();
        let (_, py, _, _) = panel_rects(1, w, h)[0];
        // Every row above the panel's caption (the empty title band and the panel's top
        // margin) stays white.
        for y in 0..py + 2 {
            for x in 0..w {
                let i = ((y * w + x) * 3) as usize;
                assert_eq!(
                    &rgb[i..i + 3],
                    &[255, 255, 255],
                    "{w}x{h}: ink at ({x}, {y})"
                );
            }
        }
    }
}
