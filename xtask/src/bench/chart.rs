//! The bench's chart: new connections per second against the number of
//! Services, one line per datapath, as a PNG.

use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use plotters::prelude::*;

use super::{Datapath, Row, median};
use crate::prerequisites::FONT;

const COLORS: [RGBColor; 5] = [
    RGBColor(90, 90, 90),
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
];

pub fn draw(rows: &[&Row], caption: &str, file: &Path) -> Result<()> {
    let font = std::fs::read(FONT)
        .with_context(|| format!("cannot read {FONT} (apt-get install fonts-dejavu-core)"))?;
    // plotters keeps registered fonts for the life of the program.
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into()))
        .map_err(|_| anyhow!("{FONT} is not a font plotters can read"))?;

    let sizes: Vec<f64> = rows.iter().map(|r| as_f64(r.services)).collect();
    let widest = sizes.iter().copied().fold(1.0, f64::max);
    let narrowest = sizes.iter().copied().fold(widest, f64::min);
    let highest = rows
        .iter()
        .filter_map(|r| median(&r.rates))
        .fold(1.0, f64::max);
    let root = BitMapBackend::new(file, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (narrowest / 2.0..widest * 2.0).log_scale(),
            0.0..highest * 1.1,
        )
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("Services in the cluster (log scale)")
        .y_desc("connections per second")
        .light_line_style(WHITE)
        .x_label_formatter(&|n| format!("{n:.0}"))
        .y_label_formatter(&|n| format!("{n:.0}"))
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(plot_error)?;
    for (datapath, color) in Datapath::ALL.into_iter().zip(COLORS) {
        let points: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.datapath == datapath)
            .filter_map(|r| Some((as_f64(r.services), median(&r.rates)?)))
            .collect();
        let style = ShapeStyle::from(color).stroke_width(3);
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(plot_error)?
            .label(datapath.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 5, color.filled())),
            )
            .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

#[expect(clippy::cast_precision_loss, reason = "cluster sizes, far below 2^52")]
fn as_f64(n: usize) -> f64 {
    n as f64
}

fn plot_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("cannot draw the chart: {error}")
}
