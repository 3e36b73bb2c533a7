//! Result charts of experiments, rendered as SVG text (720×440 px).
//!
//! A [`Chart`] holds line or scatter [`Series`] of [`Point`]s (each with an optional vertical 95%
//! interval and an optional text label) and labelled horizontal reference lines.
//! [`Chart::to_svg`] draws it with `plotters`' SVG backend. Text is written as SVG `<text>`
//! elements in the viewer's sans-serif font: plotters is built without a font rasteriser, so text
//! widths are estimates (0.6 em a character, on the wide side). The title and axis labels are
//! placed here rather than by plotters, so that long ones shrink, wrap onto two lines or, as a
//! last resort, are cut short with "…" instead of running off the picture.
//!
//! Values that cannot be drawn (NaN, infinite or beyond ±1e300, and x ≤ 0 on a log x axis) are
//! skipped and counted in a note under the chart; a chart with nothing to draw still renders,
//! with a note.

use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};

/// Width and height of the SVG, in pixels.
pub const SIZE: (u32, u32) = (720, 440);

/// One point of a series.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    /// Vertical 95% interval `(low, high)`, drawn as an error bar.
    pub ci: Option<(f64, f64)>,
    /// Drawn next to the point (for scatter plots).
    pub label: Option<String>,
}

impl Point {
    pub fn new(x: f64, y: f64) -> Self {
        Point { x, y, ci: None, label: None }
    }
    pub fn with_ci(mut self, low: f64, high: f64) -> Self {
        self.ci = Some((low, high));
        self
    }
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }
}

/// A named set of points, drawn in one colour and listed in the legend.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
    /// Connect the points in x order (otherwise markers only: a scatter plot).
    pub line: bool,
    /// Draw the connecting line dashed.
    pub dashed: bool,
}

impl Series {
    /// A series drawn as a solid line through its points.
    pub fn line(name: impl Into<String>, points: Vec<Point>) -> Self {
        Series { name: name.into(), points, line: true, dashed: false }
    }
    /// A series drawn as markers only.
    pub fn scatter(name: impl Into<String>, points: Vec<Point>) -> Self {
        Series { name: name.into(), points, line: false, dashed: false }
    }
}

/// A chart: title, axis labels, series and horizontal reference lines.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Labelled horizontal reference lines, e.g. `("base", 0.0)`, `("plain", 5.37)`.
    pub hlines: Vec<(String, f64)>,
    /// Logarithmic x axis (coefficient sweeps); points with x ≤ 0 are skipped.
    pub log_x: bool,
}

/// Series colours (Tableau 10 without its grey, which marks reference lines).
const PALETTE: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const REF_COLOR: RGBColor = RGBColor(90, 90, 90);
const NOTE_COLOR: RGBColor = RGBColor(110, 110, 110);
const FONT: &str = "sans-serif";

/// A point ready to draw: x already on the axis scale (log10 on a log axis).
struct Drawn<'a> {
    x: f64,
    y: f64,
    ci: Option<(f64, f64)>,
    label: Option<&'a str>,
}

/// An axis: its range and ticks, on the axis scale.
struct Axis {
    range: Range<f64>,
    ticks: Vec<f64>,
    minor: Vec<f64>,
    /// Decimals of the tick labels (linear axis); `None`: scientific notation.
    decimals: Option<usize>,
}

impl Axis {
    fn coord(&self) -> Ticked {
        Ticked { linear: self.range.clone().into(), ticks: self.ticks.clone(), minor: self.minor.clone() }
    }
}

/// A linear coordinate with ticks of our choosing (plotters' `WithKeyPoints` over `f64` has no
/// label formatter).
struct Ticked {
    linear: RangedCoordf64,
    ticks: Vec<f64>,
    minor: Vec<f64>,
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.linear.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.minor.clone()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.linear.range()
    }
}

impl Chart {
    /// Render the chart as a standalone SVG document.
    pub fn to_svg(&self) -> Result<String> {
        let err = |e: &dyn std::fmt::Display| Error::Invalid(format!("plot `{}`: {e}", self.title));

        // Keep what can be drawn; count what cannot.
        let mut skipped = 0usize;
        let series: Vec<Vec<Drawn>> = self
            .series
            .iter()
            .map(|s| {
                let mut pts: Vec<Drawn> = s
                    .points
                    .iter()
                    .filter_map(|p| {
                        let x = if self.log_x && p.x > 0.0 { p.x.log10() } else { p.x };
                        let ok = drawable(x) && drawable(p.y) && (!self.log_x || p.x > 0.0);
                        if !ok {
                            skipped += 1;
                            return None;
                        }
                        let ci = p.ci.filter(|(l, h)| {
                            let ok = drawable(*l) && drawable(*h);
                            skipped += usize::from(!ok);
                            ok
                        });
                        let ci = ci.map(|(l, h)| (l.min(h), l.max(h)));
                        Some(Drawn { x, y: p.y, ci, label: p.label.as_deref() })
                    })
                    .collect();
                if s.line {
                    pts.sort_by(|a, b| a.x.total_cmp(&b.x));
                }
                pts
            })
            .collect();
        let hlines: Vec<(&str, f64)> =
            self.hlines.iter().filter(|(_, v)| drawable(*v)).map(|(n, v)| (n.as_str(), *v)).collect();
        skipped += self.hlines.len() - hlines.len();

        let all = || series.iter().flatten();
        let empty = all().next().is_none();
        let xs = all().map(|p| p.x);
        let ys = all()
            .flat_map(|p| [Some(p.y), p.ci.map(|c| c.0), p.ci.map(|c| c.1)])
            .flatten()
            .chain(hlines.iter().map(|h| h.1));
        let x_axis = if self.log_x {
            let mut sweep: Vec<f64> =
                self.series.iter().zip(&series).filter(|(s, _)| s.line).flat_map(|(_, p)| p).map(|p| p.x).collect();
            sweep.sort_by(f64::total_cmp);
            sweep.dedup_by(|a, b| (*a - *b).abs() < 1e-9);
            log_axis(span(xs), (!sweep.is_empty()).then_some(sweep))
        } else {
            linear_axis(span(xs))
        };
        let y_axis = linear_axis(span(ys));

        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
            root.fill(&WHITE).map_err(|e| err(&e))?;
            let x_fmt = |v: &f64| {
                if self.log_x {
                    fmt_sig(10f64.powf(*v))
                } else {
                    fmt_tick(*v, x_axis.decimals)
                }
            };
            let y_fmt = |v: &f64| fmt_tick(*v, y_axis.decimals);

            // Title and axis labels are drawn here, not by plotters, so that long ones shrink or
            // wrap to fit instead of running off the picture.
            let width = f64::from(SIZE.0);
            let title = fit(&self.title, width - 24.0, 16.0, 12.0);
            let x_desc = fit(&self.x_label, PLOT_PX.0, 12.5, 10.0);
            let y_desc = fit(&self.y_label, PLOT_PX.1, 12.5, 10.0);
            let title_h =
                if title.lines.is_empty() { 10 } else { (title.line_h() * title.lines.len() as f64) as u32 + 12 };
            let (top, body) = root.split_vertically(title_h);
            for (i, line) in title.lines.iter().enumerate() {
                let style =
                    TextStyle::from((FONT, title.size * 1.24).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
                let y = 6 + (title.line_h() * i as f64) as i32;
                top.draw(&Text::new(line.clone(), ((width / 2.0) as i32, y), style)).map_err(|e| err(&e))?;
            }
            let tick_chars = y_axis.ticks.iter().map(|v| y_fmt(v).chars().count()).max().unwrap_or(1);
            let y_ticks_w = (tick_chars as f64 * TICK_PX * CHAR_EM) as u32 + 14;
            let y_desc_w = (y_desc.line_h() * y_desc.lines.len() as f64) as u32 + 4;
            let x_desc_h = (x_desc.line_h() * x_desc.lines.len() as f64) as u32;
            let mut chart = ChartBuilder::on(&body)
                .margin_top(4)
                .margin_left(8)
                .margin_right(20)
                .margin_bottom(16)
                .x_label_area_size(29 + x_desc_h)
                .y_label_area_size(y_ticks_w + y_desc_w)
                .build_cartesian_2d(x_axis.coord(), y_axis.coord())
                .map_err(|e| err(&e))?;
            chart
                .configure_mesh()
                .x_label_formatter(&x_fmt)
                .y_label_formatter(&y_fmt)
                .label_style((FONT, TICK_PX * 1.24))
                .bold_line_style(RGBColor(215, 215, 215))
                .light_line_style(RGBColor(238, 238, 238))
                .draw()
                .map_err(|e| err(&e))?;
            let (px, py) = chart.plotting_area().get_pixel_range();
            for (i, line) in x_desc.lines.iter().enumerate() {
                let style =
                    TextStyle::from((FONT, x_desc.size * 1.24).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
                let at = ((px.start + px.end) / 2, py.end + 27 + (x_desc.line_h() * i as f64) as i32);
                root.draw(&Text::new(line.clone(), at, style)).map_err(|e| err(&e))?;
            }
            for (i, line) in y_desc.lines.iter().enumerate() {
                // Rotated a quarter turn anticlockwise: the text's top faces left.
                let font = (FONT, y_desc.size * 1.24).into_font().transform(FontTransform::Rotate270);
                let style = TextStyle::from(font).pos(Pos::new(HPos::Center, VPos::Top));
                let x = px.start - (y_ticks_w + y_desc_w) as i32 + 2 + (y_desc.line_h() * i as f64) as i32;
                root.draw(&Text::new(line.clone(), (x, (py.start + py.end) / 2), style)).map_err(|e| err(&e))?;
            }

            let (x_lo, x_hi) = (x_axis.range.start, x_axis.range.end);
            for (name, v) in &hlines {
                let style = REF_COLOR.stroke_width(1);
                chart
                    .draw_series(DashedLineSeries::new(vec![(x_lo, *v), (x_hi, *v)], 6, 4, style))
                    .map_err(|e| err(&e))?;
                let text =
                    TextStyle::from((FONT, 13).into_font()).color(&REF_COLOR).pos(Pos::new(HPos::Right, VPos::Bottom));
                chart
                    .draw_series(std::iter::once(
                        EmptyElement::at((x_hi, *v)) + Text::new(name.to_string(), (-4, -3), text),
                    ))
                    .map_err(|e| err(&e))?;
            }

            for (i, (s, pts)) in self.series.iter().zip(&series).enumerate() {
                let color = PALETTE[i % PALETTE.len()];
                let stroke = color.stroke_width(2);
                let thin = color.stroke_width(1);
                if s.line && pts.len() > 1 {
                    let line: Vec<(f64, f64)> = pts.iter().map(|p| (p.x, p.y)).collect();
                    if s.dashed {
                        chart.draw_series(DashedLineSeries::new(line, 8, 5, stroke)).map_err(|e| err(&e))?;
                    } else {
                        chart.draw_series(LineSeries::new(line, stroke)).map_err(|e| err(&e))?;
                    }
                }
                for p in pts {
                    if let Some((lo, hi)) = p.ci {
                        chart.draw_series([PathElement::new(vec![(p.x, lo), (p.x, hi)], thin)]).map_err(|e| err(&e))?;
                        let cap = |y: f64| EmptyElement::at((p.x, y)) + PathElement::new(vec![(-4, 0), (4, 0)], thin);
                        chart.draw_series([cap(lo), cap(hi)]).map_err(|e| err(&e))?;
                    }
                }
                let (line, dashed) = (s.line, s.line && s.dashed);
                let radius = if line { 3 } else { 4 };
                let label_style =
                    TextStyle::from((FONT, 12).into_font()).color(&color).pos(Pos::new(HPos::Left, VPos::Bottom));
                chart
                    .draw_series(pts.iter().map(|p| {
                        EmptyElement::at((p.x, p.y))
                            + Circle::new((0, 0), radius, color.filled())
                            // (An unlabelled point's text is transparent: plotters writes nothing.)
                            + match p.label {
                                Some(l) => Text::new(l.to_string(), (5, -4), label_style.clone()),
                                None => Text::new(String::new(), (5, -4), label_style.color(&TRANSPARENT)),
                            }
                    }))
                    .map_err(|e| err(&e))?
                    .label(&s.name)
                    .legend(move |(x, y)| {
                        // Three segments: one line when solid, dashes when dashed, none for a scatter.
                        let seg_style = if line { stroke } else { TRANSPARENT.stroke_width(0) };
                        let segs = if dashed { [(0, 6), (9, 15), (18, 24)] } else { [(0, 8), (8, 16), (16, 24)] };
                        let seg = |(a, b): (i32, i32)| PathElement::new(vec![(a, 0), (b, 0)], seg_style);
                        EmptyElement::at((x, y))
                            + seg(segs[0])
                            + seg(segs[1])
                            + seg(segs[2])
                            + Circle::new((12, 0), radius, color.filled())
                    });
            }

            if empty {
                let mid = ((x_lo + x_hi) / 2.0, (y_axis.range.start + y_axis.range.end) / 2.0);
                let text = TextStyle::from((FONT, 16).into_font())
                    .color(&NOTE_COLOR)
                    .pos(Pos::new(HPos::Center, VPos::Center));
                chart.draw_series([Text::new("no data to plot".to_string(), mid, text)]).map_err(|e| err(&e))?;
            }
            if !self.series.is_empty() {
                chart
                    .configure_series_labels()
                    .position(legend_corner(self, &series, &hlines, &x_axis, &y_axis))
                    .margin(10)
                    .legend_area_size(32)
                    .label_font((FONT, 13))
                    .background_style(WHITE.mix(0.85))
                    .border_style(RGBColor(190, 190, 190))
                    .draw()
                    .map_err(|e| err(&e))?;
            }
            if skipped > 0 {
                let what = if self.log_x { "not finite, or x ≤ 0 on the log axis" } else { "not finite" };
                let note = format!("{skipped} value(s) not drawn ({what})");
                let text =
                    TextStyle::from((FONT, 11).into_font()).color(&NOTE_COLOR).pos(Pos::new(HPos::Right, VPos::Bottom));
                root.draw(&Text::new(note, (SIZE.0 as i32 - 6, SIZE.1 as i32 - 3), text)).map_err(|e| err(&e))?;
            }
            root.present().map_err(|e| err(&e))?;
        }
        Ok(svg)
    }
}

/// Tick labels' font size, in px.
const TICK_PX: f64 = 10.5;
/// Average advance of a character in em, a little above that of DejaVu Sans and Arial, so that
/// estimated widths err on the wide side.
const CHAR_EM: f64 = 0.6;

/// Text fitted to a width: one line, or two, at a font size in px.
struct Fitted {
    lines: Vec<String>,
    size: f64,
}

impl Fitted {
    fn line_h(&self) -> f64 {
        (self.size * 1.3).round()
    }
}

/// `text` at the largest size from `max` down to `min` px at which it fits in `width` px on one
/// line, else on two (split at the space nearest the middle), else cut short with "…".
fn fit(text: &str, width: f64, max: f64, min: f64) -> Fitted {
    let text = text.trim();
    if text.is_empty() {
        return Fitted { lines: Vec::new(), size: max };
    }
    let w = |s: &str, size: f64| s.chars().count() as f64 * CHAR_EM * size;
    let sizes = || (0..).map(|k| max - 0.5 * f64::from(k)).take_while(|&s| s >= min);
    if let Some(size) = sizes().find(|&s| w(text, s) <= width) {
        return Fitted { lines: vec![text.to_string()], size };
    }
    let half = text.chars().count() / 2;
    let split = text
        .char_indices()
        .filter(|(_, c)| *c == ' ')
        .min_by_key(|(i, _)| text[..*i].chars().count().abs_diff(half))
        .map(|(i, _)| (text[..i].trim_end(), text[i..].trim_start()));
    if let Some((a, b)) = split {
        if let Some(size) = sizes().find(|&s| w(a, s).max(w(b, s)) <= width) {
            return Fitted { lines: vec![a.to_string(), b.to_string()], size };
        }
    }
    let keep = ((width / (CHAR_EM * min)) as usize).saturating_sub(1);
    let cut: String = text.chars().take(keep).collect();
    Fitted { lines: vec![format!("{}…", cut.trim_end())], size: min }
}

/// Finite and below 1e300 in magnitude, so that ranges and their margins stay finite.
fn drawable(v: f64) -> bool {
    v.abs() < 1e300
}

/// The (min, max) of finite values; `None` when there are none.
fn span(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.filter(|v| v.is_finite()).fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// A linear axis over `span` with a 6% margin each side and 1-2-5 ticks.
fn linear_axis(span: Option<(f64, f64)>) -> Axis {
    let (lo, hi) = match span {
        None => (0.0, 1.0),
        Some((lo, hi)) if hi - lo <= f64::EPSILON * hi.abs().max(1.0) * 16.0 => {
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            (lo - pad, hi + pad)
        }
        Some((lo, hi)) => {
            let pad = (hi - lo) * 0.06;
            (lo - pad, hi + pad)
        }
    };
    let step = nice_step((hi - lo) / 6.0);
    let first = (lo / step).ceil();
    let last = (hi / step).floor();
    let ticks = if (0.0..=50.0).contains(&(last - first)) {
        (first as i64..=last as i64).map(|k| k as f64 * step).collect()
    } else {
        vec![lo, hi] // a range too narrow for its magnitude to hold steps of it
    };
    let big = lo.abs().max(hi.abs()) >= 1e6;
    // Decimals of the step; `None`: scientific notation.
    let decimals = if big || step < 1e-4 { None } else { Some((-step.log10().floor()).max(0.0) as usize) };
    Axis { range: lo..hi, ticks, minor: Vec::new(), decimals }
}

/// The 1-2-5 step nearest above `raw`.
fn nice_step(raw: f64) -> f64 {
    let raw = if raw.is_finite() && raw > 0.0 { raw } else { 1.0 };
    let mag = 10f64.powf(raw.log10().floor());
    let m = raw / mag;
    let m = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// A log10 axis over `span` (already in log10 units) with a 5% margin each side. Major ticks at
/// the x values of the line series when they are few (a coefficient sweep), else at m × 10^k for
/// the densest set of m whose labels do not crowd; minor grid at 1..9 × 10^k.
fn log_axis(span: Option<(f64, f64)>, sweep_xs: Option<Vec<f64>>) -> Axis {
    let (lo, hi) = match span {
        None => (-1.0, 1.0),
        Some((lo, hi)) if hi - lo < 1e-9 => (lo - 0.31, hi + 0.31), // x/2 .. 2x
        Some((lo, hi)) => {
            let pad = (hi - lo) * 0.05;
            (lo - pad, hi + pad)
        }
    };
    let in_range = |mults: &[f64]| -> Vec<f64> {
        let mut out = Vec::new();
        for k in (lo.floor() as i64)..=(hi.ceil() as i64) {
            for m in mults {
                let v = k as f64 + m.log10();
                if v >= lo && v <= hi {
                    out.push(v);
                }
            }
        }
        out
    };
    // The densest of these sets whose labels stay apart (about 48 px); over many decades,
    // every n-th power of ten.
    let px_per_decade = PLOT_PX.0 / (hi - lo);
    let apart = |t: &[f64]| t.windows(2).all(|w| (w[1] - w[0]) * px_per_decade >= 48.0);
    let sets: [&[f64]; 4] =
        [&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], &[1.0, 2.0, 3.0, 5.0], &[1.0, 2.0, 5.0], &[1.0, 3.0]];
    let mut ticks = sets.iter().map(|m| in_range(m)).find(|t| t.len() >= 2 && apart(t)).unwrap_or_default();
    // A sweep's own x values (few and apart) are better ticks than round numbers.
    if let Some(xs) = sweep_xs.filter(|xs| (3..=12).contains(&xs.len()) && apart(xs)) {
        ticks = xs;
    }
    if ticks.len() < 2 && hi - lo > 1.0 {
        // Many decades: every n-th power of ten.
        ticks = in_range(&[1.0]);
        let every = ticks.len().div_ceil(8).max(1) as i64;
        ticks.retain(|v| (v.round() as i64).rem_euclid(every) == 0);
    } else if ticks.len() < 2 {
        // Within a decade: round linear steps.
        let (a, b) = (10f64.powf(lo), 10f64.powf(hi));
        let step = nice_step((b - a) / 5.0);
        ticks = ((a / step).ceil() as i64..=(b / step).floor() as i64).map(|k| (k as f64 * step).log10()).collect();
    }
    let minor = if hi - lo <= 12.0 { in_range(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]) } else { Vec::new() };
    Axis { range: lo..hi, ticks, minor, decimals: None }
}

/// A tick label with a fixed number of decimals (`None`: as [`fmt_sig`]), never "-0".
fn fmt_tick(v: f64, decimals: Option<usize>) -> String {
    match decimals {
        Some(d) => fmt_fixed(v, d),
        None => fmt_sig(v),
    }
}

fn fmt_fixed(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if s.trim_start_matches('-').chars().all(|c| c == '0' || c == '.') {
        s.trim_start_matches('-').to_string()
    } else {
        s
    }
}

/// A number with up to 4 significant digits, scientific notation when very large or small.
fn fmt_sig(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if !(1e-3..1e4).contains(&a) {
        let s = format!("{v:.2e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let m = if m.contains('.') { m.trim_end_matches('0').trim_end_matches('.') } else { m };
        return format!("{m}e{e}");
    }
    let decimals = (3 - a.log10().floor() as i64).clamp(0, 6) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Approximate size of the plotting area in pixels (the SVG less margins, caption and labels).
const PLOT_PX: (f64, f64) = (624.0, 345.0);

/// The corner of the plot where the legend box covers the least: markers, intervals, lines and
/// reference lines (with their labels) are sampled, and the samples under the box counted.
fn legend_corner(
    chart: &Chart,
    series: &[Vec<Drawn>],
    hlines: &[(&str, f64)],
    x: &Axis,
    y: &Axis,
) -> SeriesLabelPosition {
    let nx = |v: f64| (v - x.range.start) / (x.range.end - x.range.start);
    let ny = |v: f64| (v - y.range.start) / (y.range.end - y.range.start);
    // (x, y, weight) in 0..1 plot units.
    let mut samples: Vec<(f64, f64, usize)> = Vec::new();
    for (s, pts) in chart.series.iter().zip(series) {
        for p in pts {
            samples.push((nx(p.x), ny(p.y), 4));
            if let Some((lo, hi)) = p.ci {
                for k in 0..=4 {
                    samples.push((nx(p.x), ny(lo + (hi - lo) * f64::from(k) / 4.0), 1));
                }
            }
            if p.label.is_some() {
                samples.push((nx(p.x) + 0.06, ny(p.y) + 0.04, 3));
            }
        }
        if s.line {
            for w in pts.windows(2) {
                for k in 1..10 {
                    let t = f64::from(k) / 10.0;
                    samples.push((nx(w[0].x + (w[1].x - w[0].x) * t), ny(w[0].y + (w[1].y - w[0].y) * t), 1));
                }
            }
        }
    }
    for (_, v) in hlines {
        samples.extend((0..=20).map(|k| (f64::from(k) / 20.0, ny(*v), 1)));
        samples.push((0.97, ny(*v) + 0.03, 8)); // the label, at the right end
    }
    // The legend box, in plot units (13 px text, 32 px icon, 10 px margins).
    let chars = chart.series.iter().map(|s| s.name.chars().count()).max().unwrap_or(0) as f64;
    let w = (chars * 7.0 + 70.0) / PLOT_PX.0;
    let h = (chart.series.len() as f64 * 16.0 + 24.0) / PLOT_PX.1;
    let corners = [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::LowerLeft, false, false),
    ];
    let mut best = (SeriesLabelPosition::UpperRight, usize::MAX);
    for (pos, right, top) in corners {
        let covered: usize = samples
            .iter()
            .filter(|&&(px, py, _)| {
                let in_x = if right { px >= 1.0 - w } else { px <= w };
                let in_y = if top { py >= 1.0 - h } else { py <= h };
                in_x && in_y
            })
            .map(|s| s.2)
            .sum();
        if covered < best.1 {
            best = (pos, covered);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chart like the experiments': a coefficient sweep with intervals, a dashed series,
    /// a scatter with labels and two reference lines.
    fn example(log_x: bool) -> Chart {
        let coefs = [0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0];
        let steered = coefs
            .iter()
            .map(|&c| {
                let y = 5.37 + 40.0 * (1.0 - (-c / 1.5f64).exp());
                Point::new(c, y).with_ci(y - 4.0 - c, y + 4.0 + c)
            })
            .collect();
        let vaccinated = coefs.iter().map(|&c| Point::new(c, 5.37 + 6.0 * c)).collect();
        let mut dashed = Series::line("vaccinated (preventive steering)", vaccinated);
        dashed.dashed = true;
        let scatter = Series::scatter(
            "checkpoints",
            vec![
                Point::new(0.75, 12.0).with_label("step 100"),
                Point::new(2.5, 30.5).with_label("step 400"),
                Point::new(3.5, 22.0).with_label("final"),
            ],
        );
        Chart {
            title: "evil score vs steering coefficient (layer 20)".into(),
            x_label: "steering coefficient".into(),
            y_label: "trait expression score (0-100)".into(),
            series: vec![Series::line("steered", steered), dashed, scatter],
            hlines: vec![("base".into(), 0.0), ("plain".into(), 5.37)],
            log_x,
        }
    }

    fn check_svg(svg: &str) {
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(&format!(r#"width="{}" height="{}""#, SIZE.0, SIZE.1)));
        let coords = svg;
        let tags = coords.lines().filter(|l| l.starts_with('<'));
        let bad: Vec<&str> = tags.filter(|l| l.contains("NaN") || l.contains("inf")).collect();
        assert!(bad.is_empty(), "non-finite coordinate in the SVG: {bad:?}");
    }

    #[test]
    fn plot_example_has_title_series_and_hlines() {
        for log_x in [false, true] {
            let chart = example(log_x);
            let svg = chart.to_svg().unwrap();
            check_svg(&svg);
            assert!(svg.contains(&chart.title));
            for s in &chart.series {
                assert!(svg.contains(&s.name), "legend lacks {}", s.name);
            }
            for (name, _) in &chart.hlines {
                assert!(svg.contains(&format!(">\n{name}\n<")) || svg.contains(&format!(">{name}<")));
            }
            assert!(svg.contains("step 400"));
            assert!(!svg.contains("not drawn"));
            if let Some(path) = std::env::var_os("PERSONA_PLOT_EXAMPLE") {
                let path = std::path::PathBuf::from(path);
                let path = if log_x { path.with_extension("log.svg") } else { path };
                std::fs::write(&path, &svg).unwrap();
            }
        }
    }

    #[test]
    fn plot_skips_non_finite_values() {
        let mut chart = example(false);
        chart.series[0].points.push(Point::new(f64::NAN, 3.0));
        chart.series[0].points.push(Point::new(1.0, f64::INFINITY));
        chart.series[1].points.push(Point::new(2.0, 7.0).with_ci(f64::NEG_INFINITY, 9.0));
        chart.hlines.push(("broken".into(), f64::NAN));
        let svg = chart.to_svg().unwrap();
        check_svg(&svg);
        assert!(svg.contains("4 value(s) not drawn"), "note of skipped values missing");
        // The NaN reference line is not drawn: no label, and the axis did not stretch to it.
        assert!(!svg.contains("broken"));
    }

    #[test]
    fn plot_empty_chart_renders_with_a_note() {
        let svg = Chart { title: "nothing yet".into(), ..Chart::default() }.to_svg().unwrap();
        check_svg(&svg);
        assert!(svg.contains("nothing yet") && svg.contains("no data to plot"));
        // Series with only unusable points: still in the legend, still a note.
        let chart = Chart {
            title: "all NaN".into(),
            series: vec![Series::line("ghost", vec![Point::new(f64::NAN, f64::NAN)])],
            ..Chart::default()
        };
        let svg = chart.to_svg().unwrap();
        check_svg(&svg);
        assert!(svg.contains("ghost") && svg.contains("no data to plot") && svg.contains("1 value(s)"));
        // Only reference lines: the y axis spans them.
        let chart = Chart { hlines: vec![("base".into(), 0.0)], ..Chart::default() };
        check_svg(&chart.to_svg().unwrap());
    }

    #[test]
    fn plot_log_x_skips_zero_and_negative_x() {
        let chart = Chart {
            title: "sweep".into(),
            series: vec![Series::line(
                "s",
                vec![Point::new(0.0, 1.0), Point::new(-1.0, 2.0), Point::new(0.5, 3.0), Point::new(8.0, 4.0)],
            )],
            log_x: true,
            ..Chart::default()
        };
        let svg = chart.to_svg().unwrap();
        check_svg(&svg);
        assert!(svg.contains("2 value(s) not drawn"));
        // One point only, or all x ≤ 0: still renders.
        for pts in [vec![Point::new(3.0, 1.0)], vec![Point::new(0.0, 1.0)]] {
            let chart = Chart { series: vec![Series::scatter("one", pts)], log_x: true, ..Chart::default() };
            check_svg(&chart.to_svg().unwrap());
        }
    }

    #[test]
    fn plot_degenerate_and_extreme_ranges() {
        let cases: Vec<Vec<Point>> = vec![
            vec![Point::new(1.0, 5.0), Point::new(1.0, 5.0)],
            vec![Point::new(0.0, 0.0)],
            vec![Point::new(1e-12, -1e12), Point::new(1e12, 1e12)],
            vec![Point::new(1.0, 1e-300), Point::new(2.0, 2e-300)],
            vec![Point::new(f64::MAX, f64::MIN), Point::new(f64::MIN_POSITIVE, f64::MAX)],
        ];
        for log_x in [false, true] {
            for pts in &cases {
                let chart = Chart {
                    series: vec![Series::line("s", pts.clone()), Series::scatter("t", pts.clone())],
                    log_x,
                    ..Chart::default()
                };
                check_svg(&chart.to_svg().unwrap());
            }
        }
    }

    #[test]
    fn plot_long_title_and_labels_shrink_or_wrap() {
        let mut chart = example(false);
        chart.title =
            "evil: projection shift after fine-tuning (steering off), by training coefficient, 3 seeds, on the medical-advice set with 10% evil answers".into();
        chart.x_label =
            "ΔP: dataset responses minus the model's own answers (projection), pooled over all traits".into();
        chart.y_label = "mean projection over the step's answer tokens, layer 20".into();
        let svg = chart.to_svg().unwrap();
        check_svg(&svg);
        for word in ["evil:", "10% evil answers", "ΔP:", "traits", "mean projection", "layer 20"] {
            assert!(svg.contains(word), "{word} missing");
        }
        if let Some(path) = std::env::var_os("PERSONA_PLOT_EXAMPLE") {
            std::fs::write(std::path::PathBuf::from(path).with_extension("long.svg"), &svg).unwrap();
        }
        let one = fit("short", 100.0, 16.0, 12.0);
        assert_eq!((one.lines.len(), one.size), (1, 16.0));
        let two = fit(&"word ".repeat(30), 700.0, 16.0, 12.0);
        assert_eq!(two.lines.len(), 2);
        assert!(two.lines.iter().all(|l| l.chars().count() as f64 * CHAR_EM * two.size <= 700.0));
        let cut = fit(&"x".repeat(500), 400.0, 16.0, 12.0);
        assert!(cut.lines.len() == 1 && cut.lines[0].ends_with('…'));
        assert!(fit("  ", 400.0, 16.0, 12.0).lines.is_empty());
    }

    #[test]
    fn plot_escapes_text_and_formats_ticks() {
        let chart = Chart {
            title: "a < b & c".into(),
            series: vec![Series::scatter("x<y", vec![Point::new(1.0, 2.0).with_label("\"q\"")])],
            ..Chart::default()
        };
        let svg = chart.to_svg().unwrap();
        assert!(svg.contains("a &lt; b &amp; c") && svg.contains("x&lt;y"));
        assert_eq!(fmt_fixed(-0.0001, 2), "0.00");
        assert_eq!(fmt_fixed(2.5, 1), "2.5");
        assert_eq!(fmt_sig(0.5), "0.5");
        assert_eq!(fmt_sig(2.0), "2");
        assert_eq!(fmt_sig(1000.0), "1000");
        assert_eq!(fmt_sig(1e-4), "1e-4");
        assert_eq!(fmt_sig(2e6), "2e6");
        assert_eq!(fmt_sig(1e4), "1e4");
        assert_eq!(fmt_sig(-0.0), "0");
        assert_eq!(nice_step(0.13), 0.2);
        assert_eq!(nice_step(7.0), 10.0);
    }
}
