//! SVG plots of a run (`--plot FILE.svg`): vCPUs and memory held per VM over time, with the
//! min / max / burst lines, and marks for reclaims (orange) and violations (red).

use std::path::Path;

use plotters::prelude::*;
use thiserror::Error;

use elastic_config::Policy;
use elastic_vmm::Line;

/// Plot failures.
#[derive(Debug, Error)]
pub enum PlotError {
    /// Drawing or writing the SVG failed.
    #[error("cannot draw {path}: {reason}")]
    Draw {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// A VM to plot.
#[derive(Debug, Clone)]
pub struct PlotVm {
    /// Its name (as in the timeline).
    pub name: String,
    /// vCPU policy.
    pub vcpus: Policy,
    /// Memory policy (bytes).
    pub memory: Policy,
}

impl PlotVm {
    /// The lines of the VM configured by `config`.
    pub fn of(config: &elastic_vmm::VmConfig) -> PlotVm {
        PlotVm { name: config.name().to_string(), vcpus: config.resources.vcpus, memory: config.resources.memory }
    }
}

const MIB: f64 = (1u64 << 20) as f64;

/// Turns `(t, value)` samples into a step line.
fn steps(points: &[(f64, f64)], end: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len() * 2 + 1);
    for (i, &(t, v)) in points.iter().enumerate() {
        if i > 0 {
            out.push((t, points[i - 1].1));
        }
        out.push((t, v));
    }
    if let Some(&(_, v)) = points.last() {
        out.push((end, v));
    }
    out
}

/// Draws one panel: held over time, policy lines, event marks.
#[allow(clippy::too_many_arguments)]
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    unit: &str,
    held: &[(f64, f64)],
    limits: [f64; 3],
    reclaims: &[f64],
    violations: &[f64],
    end: f64,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let top = (limits[2].max(held.iter().map(|p| p.1).fold(0.0, f64::max)) * 1.15).max(1.0);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..end.max(0.001), 0f64..top)
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc("seconds").y_desc(unit).light_line_style(WHITE).draw().map_err(|e| e.to_string())?;
    let names = ["min", "max", "burst"];
    let colors = [RGBColor(60, 150, 60), RGBColor(40, 90, 200), RGBColor(150, 60, 180)];
    for ((name, value), color) in names.iter().zip(limits).zip(colors) {
        chart
            .draw_series(DashedLineSeries::new(vec![(0.0, value), (end, value)], 6, 4, color.stroke_width(1)))
            .map_err(|e| e.to_string())?
            .label(format!("{name} {value:.0}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    for &t in reclaims {
        chart
            .draw_series(LineSeries::new(vec![(t, 0.0), (t, top)], RGBColor(240, 140, 0).stroke_width(1)))
            .map_err(|e| e.to_string())?;
    }
    if !reclaims.is_empty() {
        chart
            .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
            .map_err(|e| e.to_string())?
            .label(format!("reclaim ({})", reclaims.len()))
            .legend(|(x, y)| PathElement::new(vec![(x + 8, y - 6), (x + 8, y + 6)], RGBColor(240, 140, 0)));
    }
    if !violations.is_empty() {
        chart
            .draw_series(violations.iter().map(|&t| Cross::new((t, top * 0.95), 6, RED.stroke_width(2))))
            .map_err(|e| e.to_string())?
            .label(format!("violation ({})", violations.len()))
            .legend(|(x, y)| Cross::new((x + 8, y), 5, RED.stroke_width(2)));
    }
    chart
        .draw_series(LineSeries::new(steps(held, end), BLACK.stroke_width(2)))
        .map_err(|e| e.to_string())?
        .label("held")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Renders the plot of `vms` from `lines` to `path`.
pub fn render(path: &Path, title: &str, lines: &[Line], vms: &[PlotVm]) -> Result<(), PlotError> {
    let err = |reason: String| PlotError::Draw { path: path.display().to_string(), reason };
    let end = lines.iter().map(|l| l.t_us()).max().unwrap_or(1) as f64 / 1e6;
    let rows = vms.len().max(1) as u32;
    let root = SVGBackend::new(path, (1200, 40 + 300 * rows)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let body = root.titled(title, ("sans-serif", 20)).map_err(|e| err(e.to_string()))?;
    let row_areas = body.split_evenly((rows as usize, 1));
    for (vm, area) in vms.iter().zip(row_areas) {
        let mine: Vec<&Line> = lines.iter().filter(|l| l.vm() == vm.name).collect();
        let t = |l: &Line| l.t_us() as f64 / 1e6;
        let vcpus: Vec<(f64, f64)> = mine.iter().map(|l| (t(l), f64::from(l.vcpus()))).collect();
        let memory: Vec<(f64, f64)> = mine.iter().map(|l| (t(l), l.memory_bytes() as f64 / MIB)).collect();
        let marks = |event: &str, resource: &str| -> Vec<f64> {
            mine.iter()
                .filter(|l| l.event() == event && l.get("resource").and_then(|r| r.as_str()) == Some(resource))
                .map(|l| t(l))
                .collect()
        };
        let halves = area.split_evenly((1, 2));
        let p = &vm.vcpus;
        panel(
            &halves[0],
            &format!("{}: vCPUs held", vm.name),
            "vCPUs",
            &vcpus,
            [p.min as f64, p.max as f64, p.burst as f64],
            &marks("reclaim", "vcpus"),
            &marks("violation", "vcpus"),
            end,
        )
        .map_err(err)?;
        let m = &vm.memory;
        panel(
            &halves[1],
            &format!("{}: memory held", vm.name),
            "MiB",
            &memory,
            [m.min as f64 / MIB, m.max as f64 / MIB, m.burst as f64 / MIB],
            &marks("reclaim", "memory"),
            &marks("violation", "memory"),
            end,
        )
        .map_err(err)?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_hold_each_value_until_the_next_change() {
        let s = steps(&[(0.0, 1.0), (1.0, 3.0), (2.0, 2.0)], 5.0);
        assert_eq!(s, vec![(0.0, 1.0), (1.0, 1.0), (1.0, 3.0), (2.0, 3.0), (2.0, 2.0), (5.0, 2.0)]);
    }

    #[test]
    fn renders_an_svg_with_the_policy_lines_and_marks() {
        let dir = std::env::temp_dir().join(format!("plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.svg");
        let line = |t_us: u64, event: &str, vcpus: u32, resource: Option<&str>| -> Line {
            let mut v = serde_json::json!({
                "t_us": t_us, "vm": "vm0", "event": event, "vcpus": vcpus, "memory_bytes": 64u64 << 20,
            });
            if let Some(r) = resource {
                v["resource"] = r.into();
            }
            serde_json::from_value(v).unwrap()
        };
        let lines = vec![
            line(0, "boot", 1, None),
            line(100_000, "vcpu_up", 3, None),
            line(200_000, "reclaim", 3, Some("vcpus")),
            line(400_000, "violation", 3, Some("vcpus")),
            line(500_000, "vcpu_down", 2, None),
        ];
        let vm =
            PlotVm { name: "vm0".into(), vcpus: Policy { min: 1, max: 2, burst: 4 }, memory: Policy::fixed(64 << 20) };
        render(&path, "test", &lines, &[vm]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("burst 4") && svg.contains("max 2") && svg.contains("min 1"), "policy lines labelled");
        assert!(svg.contains("reclaim (1)") && svg.contains("violation (1)"), "marks labelled");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
