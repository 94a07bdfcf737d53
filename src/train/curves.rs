//! Training curves: CSV (always) and a PNG line chart per series (plotters). Axis labels need a
//! TrueType font; without DejaVu Sans on the machine the chart is drawn without text.

use plotters::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Named series logged per step.
pub struct Curves {
    pub names: Vec<&'static str>,
    pub rows: Vec<(usize, Vec<f64>)>,
}

fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let candidates = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];
        candidates.iter().any(|p| match std::fs::read(p) {
            Ok(bytes) => {
                plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
                    .is_ok()
            }
            Err(_) => false,
        })
    })
}

impl Curves {
    pub fn new(names: &[&'static str]) -> Self {
        Self { names: names.to_vec(), rows: Vec::new() }
    }

    pub fn push(&mut self, step: usize, values: Vec<f64>) {
        self.rows.push((step, values));
    }

    /// Writes `<stem>.csv` and `<stem>.png` into `dir`; returns the paths.
    pub fn write(&self, dir: &Path, stem: &str) -> anyhow::Result<Vec<PathBuf>> {
        let csv = dir.join(format!("{stem}.csv"));
        let mut f = std::io::BufWriter::new(std::fs::File::create(&csv)?);
        writeln!(f, "step,{}", self.names.join(","))?;
        for (s, v) in &self.rows {
            let vals: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
            writeln!(f, "{s},{}", vals.join(","))?;
        }
        f.flush()?;
        let png = dir.join(format!("{stem}.png"));
        self.plot(&png, stem).map_err(|e| anyhow::anyhow!("plotting {}: {e}", png.display()))?;
        Ok(vec![csv, png])
    }

    fn plot(&self, path: &Path, title: &str) -> Result<(), Box<dyn std::error::Error>> {
        let text = font_ready();
        let n = self.names.len().max(1) as u32;
        let root = BitMapBackend::new(path, (720, 260 * n)).into_drawing_area();
        root.fill(&WHITE)?;
        let areas = root.split_evenly((n as usize, 1));
        let max_step = self.rows.last().map(|r| r.0).unwrap_or(1).max(1) as f64;
        for (k, area) in areas.iter().enumerate() {
            let ys: Vec<f64> = self.rows.iter().map(|r| r.1[k]).filter(|y| y.is_finite()).collect();
            let (lo, hi) = ys.iter().fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
            let (lo, hi) = if ys.is_empty() {
                (0.0, 1.0)
            } else if hi - lo < 1e-9 {
                (lo - 0.5, hi + 0.5)
            } else {
                (lo, hi)
            };
            let mut b = ChartBuilder::on(area);
            b.margin(12).x_label_area_size(if text { 30 } else { 0 }).y_label_area_size(if text { 50 } else { 0 });
            if text {
                b.caption(format!("{title}: {}", self.names[k]), ("sans-serif", 18));
            }
            let mut chart = b.build_cartesian_2d(0f64..max_step, lo..hi)?;
            let mut mesh = chart.configure_mesh();
            if !text {
                mesh.disable_x_mesh().disable_y_mesh().x_labels(0).y_labels(0);
            }
            mesh.draw()?;
            chart.draw_series(LineSeries::new(
                self.rows.iter().map(|r| (r.0 as f64, r.1[k])).filter(|p| p.1.is_finite()),
                &BLUE,
            ))?;
        }
        root.present()?;
        Ok(())
    }
}
