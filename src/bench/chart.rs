//! The rate chart of (3): requests reaching the simulator in each second against the limit,
//! drawn with plotters into a buffer and written as PNG.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use plotters::prelude::*;

use super::dialer::RatePrecision;
use super::font;

const WIDTH: u32 = 900;
const HEIGHT: u32 = 460;
const SERIES: RGBColor = RGBColor(140, 180, 225);
const LIMIT: RGBColor = RGBColor(214, 39, 40);
const BOUND: RGBColor = RGBColor(255, 127, 14);
const GRID: RGBColor = RGBColor(225, 225, 225);
const INK: RGBColor = RGBColor(40, 40, 40);

/// Draws the chart of `rate` and writes it to `path` as PNG.
pub(crate) fn write(rate: &RatePrecision, path: &Path) -> anyhow::Result<()> {
    let mut pixels = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    draw(rate, &mut pixels).map_err(|e| anyhow!("drawing the rate chart: {e}"))?;
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .write_header()
        .and_then(|mut writer| writer.write_image_data(&pixels))
        .with_context(|| format!("writing {}", path.display()))
}

fn draw(
    rate: &RatePrecision,
    pixels: &mut [u8],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let root = BitMapBackend::with_buffer(pixels, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let limit = f64::from(rate.limit_per_sec);
    let bound = f64::from(rate.bound_per_second);
    let seconds = rate.per_second.len().max(1);
    let highest = rate.per_second.iter().copied().max().unwrap_or(0) as f64;
    let y_step = nice_step(bound.max(highest) * 1.4 / 6.0);
    let y_max = ((bound.max(highest) * 1.4) / y_step).ceil() * y_step;
    let x_max = seconds as f64;
    let x_step = if seconds <= 10 { 1.0 } else { 5.0 };

    let (left, right, top, bottom) = (70, 25, 60, 60);
    let mut chart = ChartBuilder::on(&root)
        .margin_left(left)
        .margin_right(right)
        .margin_top(top)
        .margin_bottom(bottom)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;

    // Grid and tick labels (our own font: no system fonts needed).
    let mut y = 0.0;
    while y <= y_max + 1e-9 {
        chart.draw_series(LineSeries::new([(0.0, y), (x_max, y)], &GRID))?;
        let (px, py) = chart.backend_coord(&(0.0, y));
        let label = format!("{y}");
        font::draw(
            &root,
            (px - 10 - font::width(&label, 2), py - font::HEIGHT),
            &label,
            2,
            &INK,
        )?;
        y += y_step;
    }
    let mut x = 0.0;
    while x <= x_max + 1e-9 {
        chart.draw_series(LineSeries::new([(x, 0.0), (x, y_max)], &GRID))?;
        let (px, py) = chart.backend_coord(&(x, 0.0));
        let label = format!("{x}");
        font::draw(
            &root,
            (px - font::width(&label, 2) / 2, py + 10),
            &label,
            2,
            &INK,
        )?;
        x += x_step;
    }
    chart.draw_series(LineSeries::new(
        [
            (0.0, 0.0),
            (x_max, 0.0),
            (x_max, y_max),
            (0.0, y_max),
            (0.0, 0.0),
        ],
        &INK,
    ))?;

    // Requests in each second, as bars; the limits drawn over them.
    chart.draw_series(rate.per_second.iter().enumerate().map(|(second, &count)| {
        let x = second as f64;
        Rectangle::new([(x + 0.12, 0.0), (x + 0.88, count as f64)], SERIES.filled())
    }))?;
    let mut dash = 0.0;
    while dash < x_max {
        let end = (dash + x_max / 90.0).min(x_max);
        chart.draw_series(LineSeries::new(
            [(dash, bound), (end, bound)],
            BOUND.stroke_width(2),
        ))?;
        dash += x_max / 45.0;
    }
    chart.draw_series(LineSeries::new(
        [(0.0, limit), (x_max, limit)],
        LIMIT.stroke_width(2),
    ))?;

    // Title, axis names and legend.
    let title = format!(
        "REQUESTS PER SECOND AT GENESYS (SIMULATOR): LIMIT R = {}/S, BURST {}",
        rate.limit_per_sec, rate.burst
    );
    font::draw(
        &root,
        ((WIDTH as i32 - font::width(&title, 2)) / 2, 18),
        &title,
        2,
        &INK,
    )?;
    font::draw(&root, (8, top - 22), "REQ/S", 2, &INK)?;
    let axis = "SECONDS SINCE THE FIRST REQUEST";
    font::draw(
        &root,
        (
            (WIDTH as i32 - font::width(axis, 2)) / 2,
            HEIGHT as i32 - 24,
        ),
        axis,
        2,
        &INK,
    )?;
    let legend = [
        (
            SERIES,
            format!(
                "REQUESTS IN EACH SECOND (MAX IN ANY 1 S: {})",
                rate.max_in_any_second
            ),
        ),
        (LIMIT, format!("R = {}", rate.limit_per_sec)),
        (BOUND, format!("R + BURST = {}", rate.bound_per_second)),
    ];
    let (legend_x, mut legend_y) = (left + 20, top + 14);
    for (color, text) in &legend {
        root.draw(&Rectangle::new(
            [(legend_x, legend_y + 5), (legend_x + 24, legend_y + 8)],
            color.filled(),
        ))?;
        font::draw(&root, (legend_x + 34, legend_y), text, 2, &INK)?;
        legend_y += 22;
    }
    root.present()?;
    Ok(())
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let raw = raw.max(1.0);
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|step| *step >= raw)
        .unwrap_or(10.0 * power)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_round() {
        assert_eq!(nice_step(0.3), 1.0);
        assert_eq!(nice_step(4.2), 5.0);
        assert_eq!(nice_step(6.0), 10.0);
        assert_eq!(nice_step(13.0), 20.0);
    }
}
