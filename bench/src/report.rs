//! What a benchmark leaves behind besides its table: a JSON record of every figure and
//! SVG plots, in a results directory it names (`FERRY_BENCH_RESULTS`, else
//! `bench-results/<command>-<unix time>` under the current directory).

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;

/// The results directory of one invocation of `command`, created.
///
/// # Errors
///
/// The directory cannot be created.
pub fn results_dir(command: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("FERRY_BENCH_RESULTS") {
        Some(d) => PathBuf::from(d),
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            PathBuf::from("bench-results").join(format!("{command}-{now}"))
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Median, lowest and highest of `v` (non-empty): how every benchmark states a figure
/// of several runs.
pub fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Writes `value` as `<dir>/<name>.json`.
///
/// # Errors
///
/// The file cannot be written.
pub fn write_json(
    dir: &std::path::Path,
    name: &str,
    value: &serde_json::Value,
) -> anyhow::Result<()> {
    let p = dir.join(format!("{name}.json"));
    std::fs::write(&p, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", p.display()))
}

const COLOURS: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal stacked bar chart: one bar per row, its parts side by side in the order
/// given (a part's colour is its place in `parts`), with a legend; `unit` labels the axis.
pub fn stacked_bars(
    title: &str,
    unit: &str,
    parts: &[&str],
    rows: &[(String, Vec<f64>)],
) -> String {
    let (left, width, bar, gap, top) = (150.0, 560.0, 22.0, 10.0, 60.0);
    let max = rows
        .iter()
        .map(|(_, v)| v.iter().sum::<f64>())
        .fold(0.0_f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let height = top + rows.len() as f64 * (bar + gap) + 50.0;
    let mut s = String::new();
    header(&mut s, left + width + 80.0, height, title);
    legend(&mut s, parts);
    for (r, (label, values)) in rows.iter().enumerate() {
        let y = top + r as f64 * (bar + gap);
        let _ = write!(
            s,
            r#"<text x="{x}" y="{ty}" text-anchor="end">{t}</text>"#,
            x = left - 6.0,
            ty = y + bar * 0.7,
            t = esc(label)
        );
        let mut x = left;
        for (i, v) in values.iter().enumerate() {
            let w = v / max * width;
            let _ = write!(
                s,
                r#"<rect x="{x}" y="{y}" width="{w}" height="{bar}" fill="{c}"><title>{p}: {v:.3} {u}</title></rect>"#,
                c = COLOURS[i % COLOURS.len()],
                p = esc(parts.get(i).copied().unwrap_or("")),
                u = esc(unit)
            );
            x += w;
        }
        let total: f64 = values.iter().sum();
        let _ = write!(
            s,
            r#"<text x="{tx}" y="{ty}">{total:.2}</text>"#,
            tx = x + 4.0,
            ty = y + bar * 0.7
        );
    }
    let axis_y = top + rows.len() as f64 * (bar + gap) + 10.0;
    let _ = write!(
        s,
        r#"<line x1="{left}" y1="{axis_y}" x2="{x2}" y2="{axis_y}" stroke="black"/><text x="{left}" y="{ty}">0</text><text x="{x2}" y="{ty}" text-anchor="end">{max:.2} {u}</text>"#,
        x2 = left + width,
        ty = axis_y + 16.0,
        u = esc(unit)
    );
    s.push_str("</svg>\n");
    s
}

/// Axis maximum: `max` rounded up to 1, 2 or 5 times a power of ten.
fn nice_max(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&v| v >= max)
        .unwrap_or(10.0 * p)
}

fn header(s: &mut String, w: f64, h: f64, title: &str) {
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14" font-weight="bold">{}</text>"#,
        esc(title)
    );
}

fn legend(s: &mut String, series: &[&str]) {
    let mut lx = 10.0;
    for (i, p) in series.iter().enumerate() {
        let _ = write!(
            s,
            r#"<rect x="{lx}" y="32" width="12" height="12" fill="{c}"/><text x="{tx}" y="42">{t}</text>"#,
            c = COLOURS[i % COLOURS.len()],
            tx = lx + 16.0,
            t = esc(p)
        );
        lx += 24.0 + 7.0 * p.len() as f64;
    }
}

/// A vertical grouped bar chart: one group per entry of `groups` (its label under it), one
/// bar per series in each (a series' colour is its place in `series`), values printed on
/// the bars, a y axis from 0 in `unit`. NaN values leave a gap.
pub fn grouped_bars(
    title: &str,
    unit: &str,
    series: &[&str],
    groups: &[(String, Vec<f64>)],
) -> String {
    let (left, top, plot_h, bar, gap) = (60.0, 60.0, 220.0, 26.0, 24.0);
    let bars_w = series.len().max(1) as f64 * bar;
    // Wide enough for each group's label, the legend and the title.
    let label_w = groups.iter().map(|(l, _)| l.len()).max().unwrap_or(0) as f64 * 7.5 + 12.0;
    let per_group = (bars_w + gap).max(label_w);
    let legend_w: f64 = series.iter().map(|p| 24.0 + 7.0 * p.len() as f64).sum();
    let width = (groups.len() as f64 * per_group)
        .max(200.0)
        .max(title.len() as f64 * 8.5 - left)
        .max(legend_w - left);
    let max = nice_max(
        groups
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max),
    );
    let mut s = String::new();
    header(&mut s, left + width + 20.0, top + plot_h + 50.0, title);
    legend(&mut s, series);
    let base = top + plot_h;
    for k in 0..=4 {
        let v = max * f64::from(k) / 4.0;
        let y = base - plot_h * f64::from(k) / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{left}" y1="{y}" x2="{x2}" y2="{y}" stroke="#ddd"/><text x="{tx}" y="{ty}" text-anchor="end">{v}</text>"##,
            x2 = left + width,
            tx = left - 4.0,
            ty = y + 4.0,
            v = fmt_tick(v)
        );
    }
    let _ = write!(
        s,
        r#"<text x="12" y="{y}" transform="rotate(-90 12 {y})" text-anchor="middle">{u}</text>"#,
        y = top + plot_h / 2.0,
        u = esc(unit)
    );
    for (g, (label, values)) in groups.iter().enumerate() {
        let gx = left + g as f64 * per_group + (per_group - bars_w) / 2.0;
        for (i, v) in values.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let h = v / max * plot_h;
            let x = gx + i as f64 * bar;
            let _ = write!(
                s,
                r#"<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="{c}"><title>{p} {l}: {v:.3} {u}</title></rect><text x="{tx}" y="{ty}" font-size="10" text-anchor="middle">{vt}</text>"#,
                y = base - h,
                w = bar - 2.0,
                c = COLOURS[i % COLOURS.len()],
                p = esc(series.get(i).copied().unwrap_or("")),
                l = esc(label),
                u = esc(unit),
                tx = x + bar / 2.0 - 1.0,
                ty = base - h - 3.0,
                vt = fmt_tick(*v)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{x}" y="{y}" text-anchor="middle">{t}</text>"#,
            x = gx + values.len() as f64 * bar / 2.0,
            y = base + 16.0,
            t = esc(label)
        );
    }
    let _ = write!(
        s,
        r#"<line x1="{left}" y1="{base}" x2="{x2}" y2="{base}" stroke="black"/>"#,
        x2 = left + width
    );
    s.push_str("</svg>\n");
    s
}

/// A distribution per row: every sample a dot on a horizontal axis from 0 in `unit`, the
/// median a bar across the row, and its value at the end.
pub fn dots(title: &str, unit: &str, rows: &[(String, Vec<f64>)]) -> String {
    let (left, width, row_h, top) = (190.0, 480.0, 28.0, 50.0);
    let max = nice_max(
        rows.iter()
            .flat_map(|(_, v)| v.iter().copied())
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max),
    );
    let mut s = String::new();
    let h = top + rows.len() as f64 * row_h + 40.0;
    header(&mut s, left + width + 110.0, h, title);
    for (r, (label, v)) in rows.iter().enumerate() {
        let y = top + r as f64 * row_h + row_h / 2.0;
        let _ = write!(
            s,
            r##"<text x="{x}" y="{ty}" text-anchor="end">{t}</text><line x1="{left}" y1="{y}" x2="{x2}" y2="{y}" stroke="#eee"/>"##,
            x = left - 6.0,
            ty = y + 4.0,
            t = esc(label),
            x2 = left + width
        );
        for x in v.iter().filter(|x| x.is_finite()) {
            let _ = write!(
                s,
                r#"<circle cx="{cx}" cy="{y}" r="4" fill="{c}" fill-opacity="0.6"><title>{x:.3} {u}</title></circle>"#,
                cx = left + x / max * width,
                c = COLOURS[0],
                u = esc(unit)
            );
        }
        let mut sorted: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        if let Some(m) = sorted.get(sorted.len() / 2) {
            let mx = left + m / max * width;
            let _ = write!(
                s,
                r#"<line x1="{mx}" y1="{a}" x2="{mx}" y2="{b}" stroke="{c}" stroke-width="3"/><text x="{tx}" y="{ty}">median {m:.1}</text>"#,
                a = y - 9.0,
                b = y + 9.0,
                c = COLOURS[3],
                tx = left + width + 8.0,
                ty = y + 4.0
            );
        }
    }
    let axis_y = top + rows.len() as f64 * row_h + 8.0;
    let _ = write!(
        s,
        r#"<line x1="{left}" y1="{axis_y}" x2="{x2}" y2="{axis_y}" stroke="black"/><text x="{left}" y="{ty}">0</text><text x="{x2}" y="{ty}" text-anchor="end">{max} {u}</text>"#,
        x2 = left + width,
        ty = axis_y + 16.0,
        max = fmt_tick(max),
        u = esc(unit)
    );
    s.push_str("</svg>\n");
    s
}

/// Several charts one above the other, as one SVG.
pub fn stack(charts: &[String]) -> String {
    let size = |c: &str, key: &str| -> f64 {
        c.split_once(&format!(" {key}=\""))
            .and_then(|(_, rest)| rest.split('"').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let w = charts.iter().map(|c| size(c, "width")).fold(0.0, f64::max);
    let h: f64 = charts.iter().map(|c| size(c, "height")).sum();
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let mut y = 0.0;
    for c in charts {
        let inner = c
            .trim_end()
            .replacen("<svg ", &format!(r#"<svg y="{y}" "#), 1);
        s.push_str(&inner);
        y += size(c, "height");
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Per-round bars of migration summaries (`per_round` of `ferry migrate --json`): bytes
/// moved, rate, and the rate at which the guest dirtied pages during the round before
/// (the next round's pages over this round's time), one group per round.
pub fn rounds_chart(title: &str, summaries: &[(String, serde_json::Value)]) -> String {
    /// Bytes, milliseconds and dirty pages of one round.
    type Round = (f64, f64, f64);
    let rounds = |s: &serde_json::Value| -> Vec<Round> {
        s["per_round"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| {
                        (
                            r["bytes"].as_f64().unwrap_or(0.0),
                            r["ms"].as_f64().unwrap_or(0.0),
                            r["dirty_pages"].as_f64().unwrap_or(0.0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let series: Vec<&str> = summaries.iter().map(|(n, _)| n.as_str()).collect();
    let per: Vec<Vec<Round>> = summaries.iter().map(|(_, s)| rounds(s)).collect();
    let n = per.iter().map(Vec::len).max().unwrap_or(0);
    let group = |f: &dyn Fn(&[Round], usize) -> f64| -> Vec<(String, Vec<f64>)> {
        (0..n)
            .map(|i| {
                (
                    format!("round {}", i + 1),
                    per.iter()
                        .map(|r| if i < r.len() { f(r, i) } else { f64::NAN })
                        .collect(),
                )
            })
            .collect()
    };
    let mib = group(&|r, i| r[i].0 / f64::from(1u32 << 20));
    let gbps = group(&|r, i| {
        if r[i].1 > 0.0 {
            r[i].0 * 8.0 / (r[i].1 / 1e3) / 1e9
        } else {
            f64::NAN
        }
    });
    let dirty = group(&|r, i| match r.get(i + 1) {
        Some(next) if r[i].1 > 0.0 => next.2 * 4096.0 / f64::from(1u32 << 20) / (r[i].1 / 1e3),
        _ => f64::NAN,
    });
    stack(&[
        grouped_bars(&format!("{title}: bytes per round"), "MiB", &series, &mib),
        grouped_bars(&format!("{title}: rate per round"), "Gb/s", &series, &gbps),
        grouped_bars(
            &format!(
                "{title}: guest dirtying during the round (next round's pages / this round's time)"
            ),
            "MiB/s",
            &series,
            &dirty,
        ),
    ])
}

/// Writes a benchmark's record: `<name>.json` and each `(file, svg)` into the results
/// directory of `command`, and prints where.
///
/// # Errors
///
/// The directory or a file cannot be written.
pub fn record(
    command: &str,
    value: &serde_json::Value,
    svgs: &[(&str, String)],
) -> anyhow::Result<PathBuf> {
    let dir = results_dir(command)?;
    record_in(&dir, command, value, svgs)?;
    Ok(dir)
}

/// [`record`] into a given directory.
///
/// # Errors
///
/// A file cannot be written.
pub fn record_in(
    dir: &std::path::Path,
    name: &str,
    value: &serde_json::Value,
    svgs: &[(&str, String)],
) -> anyhow::Result<()> {
    write_json(dir, name, value)?;
    for (file, svg) in svgs {
        write_svg(dir, file, svg)?;
    }
    println!("  results: {}", dir.display());
    Ok(())
}

/// Writes `svg` as `<dir>/<name>.svg`.
///
/// # Errors
///
/// The file cannot be written.
pub fn write_svg(dir: &std::path::Path, name: &str, svg: &str) -> anyhow::Result<()> {
    let p = dir.join(format!("{name}.svg"));
    std::fs::write(&p, svg).with_context(|| format!("writing {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stacked_chart_has_a_bar_piece_per_value_and_escapes_labels() {
        let svg = stacked_bars(
            "a <title>",
            "s",
            &["one", "two"],
            &[("r0".into(), vec![1.0, 2.0]), ("r1".into(), vec![0.5, 0.5])],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect x=").count(), 2 + 4, "legend + pieces");
        assert!(svg.contains("a &lt;title&gt;"));
        assert!(svg.contains(">3.00<"), "the longest bar's total");
    }

    #[test]
    fn grouped_bars_and_dots_draw_every_finite_value_on_a_nice_axis() {
        let svg = grouped_bars(
            "g",
            "Gb/s",
            &["ferry", "iperf3"],
            &[
                ("1".into(), vec![3.0, 4.0]),
                ("4".into(), vec![f64::NAN, 7.5]),
            ],
        );
        // Legend 2 + 3 finite bars (the background is a rect too).
        assert_eq!(svg.matches("<rect x=").count(), 2 + 3);
        assert!(svg.contains(">10.0<"), "axis top rounded up from 7.5");
        let d = dots("d", "ms", &[("a".into(), vec![1.0, 5.0, 3.0])]);
        assert_eq!(d.matches("<circle").count(), 3);
        assert!(d.contains("median 3.0"));
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(23.0), 50.0);
        assert_eq!(nice_max(0.7), 1.0);
    }

    #[test]
    fn the_rounds_chart_has_three_panels_and_a_dirty_rate_from_the_next_round() {
        let s = serde_json::json!({"per_round": [
            {"bytes": 1u64 << 30, "ms": 1000.0, "dirty_pages": 262_144},
            {"bytes": 1u64 << 24, "ms": 10.0, "dirty_pages": 2560},
        ]});
        let svg = rounds_chart("t", &[("run".into(), s)]);
        assert_eq!(svg.matches("<svg").count(), 4, "outer + three panels");
        // Round 1: 8.59 Gb/s; dirtying during it: 2560 pages in 1 s = 10 MiB/s.
        assert!(svg.contains("run round 1: 8.590 Gb/s"), "{svg}");
        assert!(svg.contains("run round 1: 10.000 MiB/s"), "{svg}");
    }
}
