//! Run outputs: `report.json` (schema in `spec/REPORT.md`), `report.md`, SVG plots and `prune.lock`.

use prunec_lang::{CheckedRecipe, Span};
use prunec_runtime::eval::ModelCounts;
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct Evaluation {
    pub label: String,
    pub span: Span,
    pub metrics: BTreeMap<String, f64>,
}

pub struct Round {
    pub round: usize,
    pub sparsity: f64,
    pub pqi: f64,
    pub metrics: BTreeMap<String, f64>,
}

pub struct Layer {
    /// The model the parameter belongs to.
    pub model: String,
    pub name: String,
    pub shape: Vec<usize>,
    pub total: usize,
    pub kept: usize,
}

pub struct Timing {
    pub stage: String,
    pub span: Span,
    pub seconds: f64,
}

/// Everything a run reports.
pub struct Report {
    pub recipe_path: String,
    pub recipe_sha256: String,
    pub recipe_name: String,
    pub seed: u64,
    pub params: BTreeMap<String, Json>,
    /// Params as recipe text (`92%`, `"x"`), for `prunec verify` to pass back as `--set`.
    pub params_text: BTreeMap<String, String>,
    pub inputs: Vec<(String, String)>,
    pub evaluations: Vec<Evaluation>,
    pub rounds: Vec<Round>,
    pub layers: Vec<Layer>,
    pub final_sparsity: f64,
    pub counts: Option<ModelCounts>,
    /// Files written, relative to the output folder, with their sha256.
    pub outputs: Vec<(String, String)>,
    pub timings: Vec<Timing>,
    /// `report STAGE` requests: SVG path and the metrics to plot per round.
    pub plots: Vec<(PathBuf, Vec<String>)>,
    pub exported: Option<String>,
    pub failed_assert: Option<String>,
    /// Line and column of spans, for the JSON.
    source: String,
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

impl Report {
    pub fn new(r: &CheckedRecipe, path: &Path, text: &str) -> Report {
        let params = r
            .symbols
            .iter()
            .filter(|(_, s)| s.kind == prunec_lang::check::SymKind::Param)
            .map(|(n, s)| {
                (
                    n.clone(),
                    s.value.as_ref().map(value_json).unwrap_or(Json::Null),
                )
            })
            .collect();
        let params_text = r
            .symbols
            .iter()
            .filter(|(_, s)| s.kind == prunec_lang::check::SymKind::Param)
            .filter_map(|(n, s)| s.value.as_ref().map(|v| (n.clone(), v.to_string())))
            .collect();
        Report {
            params_text,
            recipe_path: path.display().to_string(),
            recipe_sha256: sha256_hex(text.as_bytes()),
            recipe_name: r.name.clone(),
            seed: r.seed,
            params,
            inputs: vec![],
            evaluations: vec![],
            rounds: vec![],
            layers: vec![],
            final_sparsity: 0.0,
            counts: None,
            outputs: vec![],
            timings: vec![],
            plots: vec![],
            exported: None,
            failed_assert: None,
            source: text.to_string(),
        }
    }

    fn span_json(&self, s: Span) -> Json {
        let (line, column) = prunec_lang::diag::line_col(&self.source, s.start);
        json!({"start": s.start, "end": s.end, "line": line, "column": column})
    }

    pub fn to_json(&self) -> Json {
        let c = self.counts.unwrap_or(ModelCounts {
            params_dense: 0,
            params_kept: 0,
            flops_dense: 0,
            flops_kept: 0,
        });
        json!({
            "prunec_version": env!("CARGO_PKG_VERSION"),
            "recipe": {"path": self.recipe_path, "sha256": self.recipe_sha256, "name": self.recipe_name},
            "seed": self.seed,
            "params": self.params,
            "inputs": self.inputs.iter().map(|(p, h)| json!({"path": p, "sha256": h})).collect::<Vec<_>>(),
            "evaluations": self.evaluations.iter().map(|e| json!({
                "label": e.label, "span": self.span_json(e.span), "metrics": e.metrics,
            })).collect::<Vec<_>>(),
            "rounds": self.rounds.iter().map(|r| json!({
                "round": r.round, "sparsity": r.sparsity, "pqi": r.pqi, "metrics": r.metrics,
            })).collect::<Vec<_>>(),
            "layers": self.layers.iter().map(|l| json!({
                "model": l.model, "name": l.name, "shape": l.shape, "total": l.total, "kept": l.kept,
                "sparsity": 1.0 - l.kept as f64 / l.total.max(1) as f64,
            })).collect::<Vec<_>>(),
            "final": {
                "sparsity": self.final_sparsity,
                "params_total": c.params_dense, "params_kept": c.params_kept,
                "flops_dense": c.flops_dense, "flops_kept": c.flops_kept,
            },
            "outputs": self.outputs.iter().map(|(p, h)| json!({"path": p, "sha256": h})).collect::<Vec<_>>(),
            "timings": self.timings.iter().map(|t| json!({
                "stage": t.stage, "span": self.span_json(t.span), "seconds": t.seconds,
            })).collect::<Vec<_>>(),
            "failed_assert": self.failed_assert,
        })
    }

    pub fn to_markdown(&self) -> String {
        let mut md = format!("# prunec report: `{}`\n\n", self.recipe_name);
        md.push_str(&format!(
            "Recipe `{}` (sha256 `{}`), seed {}.\n\n",
            self.recipe_path,
            &self.recipe_sha256[..16],
            self.seed
        ));
        if let Some(a) = &self.failed_assert {
            md.push_str(&format!("**{a}**\n\n"));
        }
        if let Some(c) = &self.counts {
            md.push_str(&format!(
                "Final sparsity of the targeted weights: **{:.2}%**. Parameters kept: {} of {}; forward FLOPs kept: {} of {}.\n\n",
                self.final_sparsity * 100.0,
                c.params_kept,
                c.params_dense,
                c.flops_kept,
                c.flops_dense
            ));
        }
        if !self.evaluations.is_empty() {
            md.push_str("## Evaluations\n\n| evaluation | metrics |\n|---|---|\n");
            for e in &self.evaluations {
                let m: Vec<String> = e
                    .metrics
                    .iter()
                    .map(|(k, v)| format!("{k} {}", crate::exec::fmt_metric(k, *v)))
                    .collect();
                md.push_str(&format!("| {} | {} |\n", e.label, m.join(", ")));
            }
            md.push('\n');
        }
        if !self.rounds.is_empty() {
            md.push_str("## Rounds\n\n| round | sparsity | PQI | metrics |\n|---|---|---|---|\n");
            for r in &self.rounds {
                let m: Vec<String> = r
                    .metrics
                    .iter()
                    .map(|(k, v)| format!("{k} {}", crate::exec::fmt_metric(k, *v)))
                    .collect();
                md.push_str(&format!(
                    "| {} | {:.2}% | {:.4} | {} |\n",
                    r.round,
                    r.sparsity * 100.0,
                    r.pqi,
                    m.join(", ")
                ));
            }
            md.push('\n');
        }
        if !self.layers.is_empty() {
            md.push_str("## Layers\n\n| model | parameter | shape | total | kept | sparsity |\n|---|---|---|---|---|---|\n");
            for l in &self.layers {
                md.push_str(&format!(
                    "| {} | `{}` | {:?} | {} | {} | {:.2}% |\n",
                    l.model,
                    l.name,
                    l.shape,
                    l.total,
                    l.kept,
                    100.0 * (1.0 - l.kept as f64 / l.total.max(1) as f64)
                ));
            }
            md.push('\n');
        }
        md
    }
}

fn value_json(v: &prunec_lang::check::Value) -> Json {
    serde_json::to_value(v)
        .map(|j| j.get("value").cloned().unwrap_or(j))
        .unwrap_or(Json::Null)
}

/// A bar chart of per-layer sparsity.
fn sparsity_svg(layers: &[Layer]) -> String {
    let w = 640.0;
    let bar_h = 22.0;
    let h = 40.0 + bar_h * layers.len() as f64;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    svg.push_str(r#"<text x="10" y="20" font-weight="bold">sparsity per parameter</text>"#);
    for (i, l) in layers.iter().enumerate() {
        let s = 1.0 - l.kept as f64 / l.total.max(1) as f64;
        let y = 30.0 + bar_h * i as f64;
        svg.push_str(&format!(
            r##"<text x="10" y="{:.1}">{}</text><rect x="200" y="{:.1}" width="{:.1}" height="{:.1}" fill="#4a7ab5"/><text x="{:.1}" y="{:.1}">{:.2}%</text>"##,
            y + 15.0,
            l.name,
            y + 4.0,
            360.0 * s,
            bar_h - 8.0,
            205.0 + 360.0 * s,
            y + 15.0,
            s * 100.0
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

/// Line plots of metrics per round, one panel per metric.
fn rounds_svg(rounds: &[Round], metrics: &[String]) -> String {
    let pw = 300.0;
    let ph = 180.0;
    let w = 40.0 + (pw + 40.0) * metrics.len().max(1) as f64;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{}" font-family="sans-serif" font-size="12">"#,
        ph + 60.0
    );
    for (k, m) in metrics.iter().enumerate() {
        let x0 = 40.0 + (pw + 40.0) * k as f64;
        let vals: Vec<(f64, f64)> = rounds
            .iter()
            .filter_map(|r| {
                let v = match m.as_str() {
                    "sparsity" => Some(r.sparsity),
                    "pqi" => Some(r.pqi),
                    other => r.metrics.get(other).copied(),
                };
                v.map(|v| (r.round as f64, v))
            })
            .collect();
        svg.push_str(&format!(
            r#"<text x="{x0}" y="20" font-weight="bold">{m} per round</text>"#
        ));
        svg.push_str(&format!(
            r##"<rect x="{x0}" y="30" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
        ));
        if vals.is_empty() {
            continue;
        }
        let (lo, hi) = vals
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (_, v)| {
                (a.min(*v), b.max(*v))
            });
        let span = if hi > lo { hi - lo } else { 1.0 };
        let nmax = vals.iter().map(|(r, _)| *r).fold(1.0, f64::max);
        let pts: Vec<String> = vals
            .iter()
            .map(|(r, v)| {
                format!(
                    "{:.1},{:.1}",
                    x0 + pw * (r - 1.0) / (nmax - 1.0).max(1.0),
                    30.0 + ph - ph * (v - lo) / span
                )
            })
            .collect();
        svg.push_str(&format!(
            r##"<polyline points="{}" fill="none" stroke="#c0392b" stroke-width="2"/>"##,
            pts.join(" ")
        ));
        svg.push_str(&format!(
            r#"<text x="{x0}" y="{}">{lo:.4} .. {hi:.4}</text>"#,
            ph + 50.0
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

/// Writes the plots, `report.json`, `report.md` and `prune.lock` into `dir`.
pub fn write_all(report: &mut Report, dir: &Path) -> std::io::Result<()> {
    let mut files: Vec<(PathBuf, String)> =
        vec![(PathBuf::from("sparsity.svg"), sparsity_svg(&report.layers))];
    for (path, metrics) in &report.plots {
        files.push((path.clone(), rounds_svg(&report.rounds, metrics)));
    }
    for (path, text) in files {
        if path.is_absolute()
            || path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(std::io::Error::other(format!(
                "plot path {} must stay inside the output folder",
                path.display()
            )));
        }
        let full = dir.join(&path);
        if let Some(p) = full.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::write(&full, &text)?;
        report
            .outputs
            .push((path.display().to_string(), sha256_hex(text.as_bytes())));
    }
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report.to_json()).unwrap() + "\n",
    )?;
    std::fs::write(dir.join("report.md"), report.to_markdown())?;
    let lock = json!({
        "prunec_version": env!("CARGO_PKG_VERSION"),
        "recipe": {"path": report.recipe_path, "sha256": report.recipe_sha256},
        "seed": report.seed,
        "params": report.params,
        "params_text": report.params_text,
        "inputs": report.inputs.iter().map(|(p, h)| json!({"path": p, "sha256": h})).collect::<Vec<_>>(),
        "outputs": report.outputs.iter().map(|(p, h)| json!({"path": p, "sha256": h})).collect::<Vec<_>>(),
    });
    std::fs::write(
        dir.join("prune.lock"),
        serde_json::to_string_pretty(&lock).unwrap() + "\n",
    )?;
    Ok(())
}
