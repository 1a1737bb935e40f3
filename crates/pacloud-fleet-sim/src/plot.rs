//! Minimal SVG line charts (no plotting dependency): one chart per metric,
//! one polyline per policy, axes with ticks and a legend.

use std::fmt::Write;

/// One line of a chart.
pub struct Line<'a> {
    pub label: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

/// An SVG document: `title`, x in hours, y labelled `y_label`.
pub fn chart(title: &str, y_label: &str, lines: &[Line<'_>]) -> String {
    let (w, h, left, right, top, bottom) = (800.0, 360.0, 70.0, 20.0, 40.0, 45.0);
    let xmax = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0)).fold(0.0, f64::max).max(1.0).ceil();
    let ymax = nice_max(lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)).fold(0.0, f64::max));
    let px = |x: f64| left + (w - left - right) * x / xmax;
    let py = |y: f64| top + (h - top - bottom) * (1.0 - y / ymax);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{title}</text>"#, w / 2.0);
    for k in 0..=4 {
        let y = ymax * f64::from(k) / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{py}" x2="{}" y2="{py}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            w - right,
            left - 6.0,
            py(y) + 4.0,
            trim(y),
            py = py(y)
        );
    }
    let step = if xmax > 48.0 {
        12.0
    } else if xmax > 12.0 {
        3.0
    } else {
        1.0
    };
    let mut x = 0.0;
    while x <= xmax {
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, px(x), h - bottom + 16.0, x);
        x += step;
    }
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">hour of the day</text>"#, w / 2.0, h - 8.0);
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{y_label}</text>"#,
        h / 2.0,
        h / 2.0
    );
    let _ = writeln!(
        s,
        r#"<polyline points="{left},{top} {left},{} {},{}" fill="none" stroke="black"/>"#,
        h - bottom,
        w - right,
        h - bottom
    );
    for (n, l) in lines.iter().enumerate() {
        let pts: Vec<String> = l.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="1.5"/>"#,
            pts.join(" "),
            l.color
        );
        let ly = top + 14.0 + 16.0 * n as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            left + 12.0,
            left + 32.0,
            l.color,
            left + 38.0,
            ly + 4.0,
            l.label
        );
    }
    s.push_str("</svg>\n");
    s
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_one_polyline_per_line_and_a_legend() {
        let svg = chart(
            "t",
            "y",
            &[
                Line { label: "a", color: "red", points: vec![(0.0, 1.0), (1.0, 3.0)] },
                Line { label: "b", color: "blue", points: vec![(0.0, 0.0), (2.0, 7.0)] },
            ],
        );
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("stroke-width=\"1.5\"").count(), 2);
        assert!(svg.contains(">a</text>") && svg.contains(">b</text>"));
        assert_eq!(nice_max(7.0), 10.0);
        assert_eq!(nice_max(0.018), 0.02);
    }
}
