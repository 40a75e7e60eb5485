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
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#,
        w = left + width + 80.0
    );
    let _ = write!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="10" y="20" font-size="14" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let mut lx = 10.0;
    for (i, p) in parts.iter().enumerate() {
        let _ = write!(
            s,
            r#"<rect x="{lx}" y="32" width="12" height="12" fill="{c}"/><text x="{tx}" y="42">{t}</text>"#,
            c = COLOURS[i % COLOURS.len()],
            tx = lx + 16.0,
            t = esc(p)
        );
        lx += 24.0 + 7.0 * p.len() as f64;
    }
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
}
