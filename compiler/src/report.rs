//! Run outputs: `report.json` (schema in `spec/REPORT.md`), `report.md`, SVG plots and `prune.lock`.

use prunec_lang::resolved::Metric;
use prunec_lang::{CheckedRecipe, Span};
use prunec_runtime::eval::ModelCounts;
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone)]
pub struct Evaluation {
    pub label: String,
    pub span: Span,
    pub metrics: BTreeMap<String, f64>,
    /// A classifier evaluation's sha256 of its top-1 predictions (see
    /// `prunec_runtime::eval::Metrics`).
    pub predictions_sha256: Option<String>,
    /// A language model's perplexity decoded with a bounded key-value cache.
    pub kv_cache: Option<KvCacheUsed>,
}

/// The bounded cache an evaluation ran with: its policy and the keys each
/// query attended to at most, of the window's length.
#[derive(Clone)]
pub struct KvCacheUsed {
    pub policy: String,
    pub budget: f64,
    pub keys: usize,
    pub window: usize,
}

#[derive(Clone)]
pub struct Round {
    pub round: usize,
    pub sparsity: f64,
    pub pqi: f64,
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Clone)]
pub struct Layer {
    /// The model the parameter belongs to.
    pub model: String,
    pub name: String,
    pub shape: Vec<usize>,
    pub total: usize,
    pub kept: usize,
}

/// One executed step: a pipeline stage run once on one model state, shared
/// by every sweep variant in `variants` (empty for a run without a sweep).
#[derive(Clone)]
pub struct Step {
    /// The plan step it ran (`prunec plan` lists them by this id).
    pub id: String,
    pub kind: String,
    /// The model the stage works on (empty for `assert` and `report`; a
    /// data prune's scoring model, empty for `random()`).
    pub model: String,
    /// The data set a data prune works on.
    pub data: Option<String>,
    pub span: Span,
    pub variants: Vec<String>,
    pub seconds: f64,
    /// Set when the stage did not run because the model named already held
    /// its result (same declaration, same training so far): its state was copied.
    pub copied_from: Option<String>,
}

/// Everything a run reports.
#[derive(Clone)]
pub struct Report {
    pub recipe_path: String,
    pub recipe_sha256: String,
    pub recipe_name: String,
    pub seed: u64,
    pub params: BTreeMap<String, Json>,
    /// Params as recipe text (`92%`, `"x"`), for `prunec verify` to pass back as `--set`.
    pub params_text: BTreeMap<String, String>,
    pub inputs: Vec<(String, String)>,
    /// The class names of each data set that names its classes (image folders), in label order.
    pub classes: BTreeMap<String, Vec<String>>,
    pub evaluations: Vec<Evaluation>,
    pub rounds: Vec<Round>,
    /// Each `unit = ...` prune stage: the widths it left.
    pub shrinks: Vec<Shrink>,
    /// Each `by armor(...)` stage: every layer's calibration loss before
    /// (the initial method's result) and after ARMOR.
    pub armor: Vec<ArmorStage>,
    pub data_pruned: Vec<DataPruned>,
    pub analyses: Vec<OracleStudy>,
    pub agreements: Vec<AgreementStudy>,
    pub sensitivities: Vec<SensitivityStudy>,
    pub searches: Vec<SearchStudy>,
    pub layers: Vec<Layer>,
    pub final_sparsity: f64,
    pub counts: Option<ModelCounts>,
    /// Files written, relative to the output folder, with their sha256.
    pub outputs: Vec<(String, String)>,
    pub steps: Vec<Step>,
    /// Stages the plan dropped (dead-code elimination), which did not run.
    pub dropped: Vec<crate::plan::Dropped>,
    /// `report STAGE` requests: SVG path and the metrics to plot per round.
    pub plots: Vec<(PathBuf, Vec<String>)>,
    pub exported: Option<String>,
    /// Each export: its path in the output folder, format and size in bytes
    /// (all files of a folder together).
    pub exports: Vec<(String, String, u64)>,
    /// Export folders that get a copy of the run's `prune.lock`.
    pub lock_copies: Vec<PathBuf>,
    pub failed_assert: Option<String>,
    /// Line and column of spans, for the JSON.
    source: String,
}

/// An oracle study (`analyze ... by oracle(...)`): one row per candidate mask.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OracleStudy {
    pub step: String,
    pub span: Span,
    pub model: String,
    pub label: Option<String>,
    pub data: String,
    pub test: String,
    pub unit: String,
    pub fraction: f64,
    /// Per candidate: the loss on `data` right after pruning, then the
    /// accuracy and loss on `test` after retraining.
    pub candidates: Vec<(f64, f64, f64)>,
    pub kendall_tau: f64,
    /// The scatter plot, relative to the output folder.
    pub plot: String,
}

/// One level of a sensitivity study: sparsity, accuracy, loss.
pub type LevelResult = (f64, f64, f64);

/// A sensitivity study (`analyze ... by sensitivity(c, levels)`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SensitivityStudy {
    pub step: String,
    pub span: Span,
    pub model: String,
    pub label: Option<String>,
    pub data: String,
    pub criterion: String,
    /// Accuracy and loss of the model as it is.
    pub dense: (f64, f64),
    /// Per weight tensor, per level: the sparsity, accuracy and loss.
    pub tensors: Vec<(String, Vec<LevelResult>)>,
    pub plot: String,
}

/// One candidate allocation of a search.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SearchPoint {
    /// Every block's sparsity.
    pub blocks: Vec<f64>,
    /// The share of the targeted weights removed (1 − kept).
    pub sparsity: f64,
    /// On the search's data, the model masked by the candidate.
    pub perplexity: f64,
}

impl SearchPoint {
    /// Every block at the same sparsity (the initial uniform candidates).
    pub fn uniform(&self) -> bool {
        self.blocks.windows(2).all(|w| w[0] == w[1])
    }
}

/// A per-block sparsity search (`analyze ... by search(...)`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SearchStudy {
    pub step: String,
    pub span: Span,
    pub model: String,
    pub label: Option<String>,
    pub data: String,
    pub criterion: String,
    pub population: usize,
    pub generations: usize,
    pub range: (f64, f64),
    /// Perplexity of the model as it is on the search's data.
    pub dense_perplexity: f64,
    /// Targeted weights per block (the weights of the sparsity average).
    pub block_weights: Vec<usize>,
    /// The Pareto front, from the lowest perplexity (least sparse) up.
    pub front: Vec<SearchPoint>,
    /// Index of the knee in `front`.
    pub knee: usize,
    /// Every distinct candidate evaluated, in evaluation order.
    pub candidates: Vec<SearchPoint>,
    pub plot: String,
}

/// A criterion agreement study (`analyze ... by agreement(a, b)`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgreementStudy {
    pub step: String,
    pub span: Span,
    pub model: String,
    pub label: Option<String>,
    pub data: String,
    /// The two criteria as written.
    pub a: String,
    pub b: String,
    pub fraction: f64,
    /// Per weight tensor: its name, size, Spearman's ρ and the overlap.
    pub tensors: Vec<(String, usize, f64, f64)>,
    pub spearman: f64,
    pub overlap: f64,
    pub plot: String,
}

/// What a data-set prune kept.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DataPruned {
    /// The plan step (`3`).
    pub step: String,
    pub span: Span,
    pub data: String,
    pub score: String,
    pub model: Option<String>,
    /// The fraction removed, as the recipe asks.
    pub fraction: f64,
    pub per_class: bool,
    pub keep: String,
    pub samples: usize,
    /// Per class: samples before and after.
    pub classes: Vec<(usize, usize)>,
    /// Samples a forgetting count never saw classified correctly.
    pub never_learned: Option<usize>,
    /// The kept samples' indices in the data set's file order (the split as
    /// declared, before this stage), ascending.
    pub kept: Vec<u32>,
    /// The output file listing them, one per line.
    pub file: String,
}

/// What an ARMOR stage did to each layer's calibration loss `‖(W − Ŵ) X‖²`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ArmorStage {
    pub step: String,
    pub model: String,
    /// Layer, loss of the initial method's result, loss after ARMOR.
    pub layers: Vec<(String, f64, f64)>,
}

/// What a `unit = ...` prune stage removed from a model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Shrink {
    pub model: String,
    /// The stage's line in the recipe.
    pub line: usize,
    pub unit: String,
    /// Layer, units before the stage, units after.
    pub layers: Vec<(String, usize, usize)>,
    pub params_before: usize,
    pub params_after: usize,
}

/// A metric as people read it.
pub fn fmt_metric(name: &str, v: f64) -> String {
    match name {
        "accuracy" | "sparsity" | "target_sparsity" | "prune_ratio" => {
            format!("{:.2}%", v * 100.0)
        }
        "params" | "flops" | "step" => format!("{v:.0}"),
        "latency" => format!("{v:.3} ms"),
        "throughput" => format!("{v:.0}/s"),
        _ => format!("{v:.4}"),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

impl Report {
    pub fn new(r: &CheckedRecipe, path: &Path, text: &str) -> Report {
        let (params, params_text) = params_of(r);
        Report {
            params_text,
            recipe_path: path.display().to_string(),
            recipe_sha256: sha256_hex(text.as_bytes()),
            recipe_name: r.name.clone(),
            seed: r.seed,
            params,
            inputs: vec![],
            classes: BTreeMap::new(),
            evaluations: vec![],
            rounds: vec![],
            shrinks: vec![],
            armor: vec![],
            data_pruned: vec![],
            analyses: vec![],
            agreements: vec![],
            sensitivities: vec![],
            searches: vec![],
            layers: vec![],
            final_sparsity: 0.0,
            counts: None,
            outputs: vec![],
            steps: vec![],
            dropped: vec![],
            plots: vec![],
            exported: None,
            exports: vec![],
            lock_copies: vec![],
            failed_assert: None,
            source: text.to_string(),
        }
    }

    /// Takes the params of `r` (a sweep variant forked from a shared state).
    pub fn set_params(&mut self, r: &CheckedRecipe) {
        (self.params, self.params_text) = params_of(r);
    }

    pub fn step_json(&self, t: &Step) -> Json {
        json!({
            "id": t.id, "kind": t.kind, "model": t.model, "data": t.data, "span": self.span_json(t.span),
            "variants": t.variants, "seconds": t.seconds, "copied_from": t.copied_from,
        })
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
            "classes": self.classes,
            "evaluations": self.evaluations.iter().map(|e| {
                let mut v = json!({"label": e.label, "span": self.span_json(e.span), "metrics": e.metrics});
                if let Some(h) = &e.predictions_sha256 {
                    v["predictions_sha256"] = json!(h);
                }
                if let Some(kv) = &e.kv_cache {
                    v["kv_cache"] = json!({"policy": kv.policy, "budget": kv.budget, "keys": kv.keys, "window": kv.window});
                }
                v
            }).collect::<Vec<_>>(),
            "rounds": self.rounds.iter().map(|r| json!({
                "round": r.round, "sparsity": r.sparsity, "pqi": r.pqi, "metrics": r.metrics,
            })).collect::<Vec<_>>(),
            "armor": self.armor.iter().map(|a| json!({
                "step": a.step, "model": a.model,
                "loss_before": a.layers.iter().map(|l| l.1).sum::<f64>(),
                "loss_after": a.layers.iter().map(|l| l.2).sum::<f64>(),
                "layers": a.layers.iter().map(|(n, b, f)| json!({"name": n, "loss_before": b, "loss_after": f})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "units_removed": self.shrinks.iter().map(|s| json!({
                "model": s.model, "line": s.line, "unit": s.unit,
                "layers": s.layers.iter().map(|(n, b, a)| json!({"layer": n, "before": b, "after": a})).collect::<Vec<_>>(),
                "params_before": s.params_before, "params_after": s.params_after,
            })).collect::<Vec<_>>(),
            "data_pruned": self.data_pruned.iter().map(|d| json!({
                "step": d.step, "span": self.span_json(d.span), "data": d.data, "score": d.score,
                "model": d.model, "fraction": d.fraction, "per_class": d.per_class, "keep": d.keep,
                "samples": d.samples, "kept": d.kept.len(),
                "classes": d.classes.iter().map(|(b, a)| json!({"before": b, "after": a})).collect::<Vec<_>>(),
                "never_learned": d.never_learned, "file": d.file, "kept_indices": d.kept,
            })).collect::<Vec<_>>(),
            "analyses": self.analyses.iter().map(|a| json!({
                "step": a.step, "span": self.span_json(a.span), "analysis": "oracle", "model": a.model,
                "label": a.label, "data": a.data, "test": a.test, "unit": a.unit, "fraction": a.fraction,
                "kendall_tau": a.kendall_tau, "plot": a.plot,
                "candidates": a.candidates.iter().map(|(l, acc, tl)| json!({
                    "loss_after_pruning": l, "accuracy_after_retraining": acc, "loss_after_retraining": tl,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "sensitivities": self.sensitivities.iter().map(|a| json!({
                "step": a.step, "span": self.span_json(a.span), "analysis": "sensitivity", "model": a.model,
                "label": a.label, "data": a.data, "criterion": a.criterion,
                "dense": {"accuracy": a.dense.0, "loss": a.dense.1}, "plot": a.plot,
                "tensors": a.tensors.iter().map(|(n, per)| json!({
                    "name": n,
                    "levels": per.iter().map(|(s, acc, l)| json!({"sparsity": s, "accuracy": acc, "loss": l})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "searches": self.searches.iter().map(|a| {
                let point = |p: &SearchPoint| json!({
                    "sparsity": p.sparsity, "perplexity": p.perplexity, "uniform": p.uniform(), "blocks": p.blocks,
                });
                json!({
                    "step": a.step, "span": self.span_json(a.span), "analysis": "search", "model": a.model,
                    "label": a.label, "data": a.data, "criterion": a.criterion,
                    "population": a.population, "generations": a.generations, "range": [a.range.0, a.range.1],
                    "evaluated": a.candidates.len(), "dense_perplexity": a.dense_perplexity,
                    "block_weights": a.block_weights, "knee": a.knee, "plot": a.plot,
                    "front": a.front.iter().map(point).collect::<Vec<_>>(),
                    "candidates": a.candidates.iter().map(|p| json!({
                        "sparsity": p.sparsity, "perplexity": p.perplexity, "blocks": p.blocks,
                    })).collect::<Vec<_>>(),
                })
            }).collect::<Vec<_>>(),
            "agreements": self.agreements.iter().map(|a| json!({
                "step": a.step, "span": self.span_json(a.span), "analysis": "agreement", "model": a.model,
                "label": a.label, "data": a.data, "a": a.a, "b": a.b, "fraction": a.fraction,
                "spearman": a.spearman, "overlap": a.overlap, "plot": a.plot,
                "tensors": a.tensors.iter().map(|(n, size, rho, o)| json!({
                    "name": n, "weights": size, "spearman": rho, "overlap": o,
                })).collect::<Vec<_>>(),
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
            "exports": self.exports.iter().map(|(p, f, b)| json!({"path": p, "format": f, "bytes": b})).collect::<Vec<_>>(),
            "peak_memory_bytes": peak_memory_bytes(),
            "steps": self.steps.iter().map(|t| self.step_json(t)).collect::<Vec<_>>(),
            "dropped": self.dropped.iter().map(|d| json!({
                "id": d.id, "kind": d.kind.keyword(), "span": self.span_json(d.span), "why": d.why,
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
        if !self.exports.is_empty() {
            md.push_str("## Exports\n\n| path | format | size |\n|---|---|---|\n");
            for (p, f, b) in &self.exports {
                md.push_str(&format!(
                    "| `{p}` | {f} | {:.2} MiB ({b} bytes) |\n",
                    *b as f64 / 1048576.0
                ));
            }
            md.push('\n');
        }
        if let Some(peak) = peak_memory_bytes() {
            md.push_str(&format!(
                "Peak resident memory of the run: {:.0} MiB.\n\n",
                peak as f64 / 1048576.0
            ));
        }
        if !self.evaluations.is_empty() {
            md.push_str("## Evaluations\n\n| evaluation | metrics |\n|---|---|\n");
            for e in &self.evaluations {
                let m: Vec<String> = e
                    .metrics
                    .iter()
                    .map(|(k, v)| format!("{k} {}", fmt_metric(k, *v)))
                    .collect();
                let kv = e
                    .kv_cache
                    .as_ref()
                    .map(|kv| {
                        format!(
                            " (cache of {} of {} keys, {})",
                            kv.keys, kv.window, kv.policy
                        )
                    })
                    .unwrap_or_default();
                md.push_str(&format!("| {} | {}{kv} |\n", e.label, m.join(", ")));
            }
            md.push('\n');
        }
        // Timed evaluations side by side, each against the first.
        let timed: Vec<(&str, f64, Option<f64>)> = self
            .evaluations
            .iter()
            .filter_map(|e| {
                let ms = *e.metrics.get("latency")?;
                Some((e.label.as_str(), ms, e.metrics.get("throughput").copied()))
            })
            .collect();
        if timed.len() > 1 {
            md.push_str("## Speed\n\nForward passes timed in this run (a timing of this machine, not locked).\n\n| evaluation | latency | throughput | speedup over the first |\n|---|---|---|---|\n");
            let base = timed[0].1;
            for (label, ms, tp) in &timed {
                md.push_str(&format!(
                    "| {label} | {} | {} | {:.2}x |\n",
                    fmt_metric("latency", *ms),
                    tp.map_or("".into(), |t| fmt_metric("throughput", t)),
                    base / ms.max(1e-12)
                ));
            }
            md.push('\n');
        }
        if !self.rounds.is_empty() {
            md.push_str("## Rounds\n\n| round | sparsity | PQI | metrics |\n|---|---|---|---|\n");
            for r in &self.rounds {
                let m: Vec<String> = r
                    .metrics
                    .iter()
                    .map(|(k, v)| format!("{k} {}", fmt_metric(k, *v)))
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
        for a in &self.analyses {
            md.push_str(&format!(
                "## Oracle study: step {} (`{}`)\n\n{} candidate masks, each removing a random {:.2}% of every layer's {}s from a copy of `{}`: the loss on `{}` right after pruning against the accuracy on `{}` after retraining. Kendall's τ-b = **{:.4}** (−1: the lowest loss after pruning always retrains best). Plot: `{}`.\n\n| candidate | loss after pruning | accuracy after retraining | loss after retraining |\n|---|---|---|---|\n",
                a.step,
                a.label.as_deref().unwrap_or("oracle"),
                a.candidates.len(),
                a.fraction * 100.0,
                a.unit,
                a.model,
                a.data,
                a.test,
                a.kendall_tau,
                a.plot
            ));
            for (k, (l, acc, tl)) in a.candidates.iter().enumerate() {
                md.push_str(&format!(
                    "| {} | {l:.4} | {:.2}% | {tl:.4} |\n",
                    k + 1,
                    acc * 100.0
                ));
            }
            md.push('\n');
        }
        for a in &self.searches {
            md.push_str(&format!(
                "## Search: step {} (`{}`)\n\nNSGA-II over the block sparsities of `{}` ({} blocks, each in {:.0}% .. {:.0}%): {} candidates evaluated ({} per generation, {} generations), each masked per row by `{}` and scored by perplexity on `{}` (dense {:.2}) and the weights it keeps. The Pareto front, the knee marked; plot: `{}`.\n\n| # | sparsity | perplexity | blocks (min .. max) | |\n|---|---|---|---|---|\n",
                a.step,
                a.label.as_deref().unwrap_or("search"),
                a.model,
                a.block_weights.len(),
                a.range.0 * 100.0,
                a.range.1 * 100.0,
                a.candidates.len(),
                a.population,
                a.generations,
                a.criterion,
                a.data,
                a.dense_perplexity,
                a.plot
            ));
            for (i, p) in a.front.iter().enumerate() {
                let lo = p.blocks.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = p.blocks.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let mut note = Vec::new();
                if i == a.knee {
                    note.push("knee");
                }
                if p.uniform() {
                    note.push("uniform");
                }
                md.push_str(&format!(
                    "| {i} | {:.2}% | {:.2} | {:.1}% .. {:.1}% | {} |\n",
                    p.sparsity * 100.0,
                    p.perplexity,
                    lo * 100.0,
                    hi * 100.0,
                    note.join(", ")
                ));
            }
            if let Some(k) = a.front.get(a.knee) {
                let blocks: Vec<String> = k
                    .blocks
                    .iter()
                    .map(|b| format!("{:.1}%", b * 100.0))
                    .collect();
                md.push_str(&format!(
                    "\nThe knee's block sparsities: {}.\n",
                    blocks.join(", ")
                ));
            }
            md.push('\n');
        }
        for a in &self.sensitivities {
            let levels: Vec<f64> = a
                .tensors
                .first()
                .map(|(_, per)| per.iter().map(|p| p.0).collect())
                .unwrap_or_default();
            md.push_str(&format!(
                "## Sensitivity: step {} (`{}`)\n\nEach weight tensor of a copy of `{}` pruned alone by `{}`, accuracy on `{}` right after pruning (dense {:.2}%). Plot: `{}`.\n\n| tensor |",
                a.step,
                a.label.as_deref().unwrap_or("sensitivity"),
                a.model,
                a.criterion,
                a.data,
                a.dense.0 * 100.0,
                a.plot
            ));
            for l in &levels {
                md.push_str(&format!(" {:.0}% |", l * 100.0));
            }
            md.push_str(&format!("\n|---|{}\n", "---|".repeat(levels.len())));
            for (n, per) in &a.tensors {
                md.push_str(&format!("| `{n}` |"));
                for (_, acc, _) in per {
                    md.push_str(&format!(" {:.2}% |", acc * 100.0));
                }
                md.push('\n');
            }
            md.push('\n');
        }
        for a in &self.agreements {
            md.push_str(&format!(
                "## Criterion agreement: step {} (`{}`)\n\n`{}` against `{}` on every weight tensor of `{}` (statistics on `{}`): Spearman's ρ of the scores and the share of the lowest-scored {:.2}% that both pick. Over all tensors: ρ = **{:.4}**, overlap **{:.2}%**. Plot: `{}`.\n\n| tensor | weights | Spearman ρ | overlap |\n|---|---|---|---|\n",
                a.step,
                a.label.as_deref().unwrap_or("agreement"),
                a.a,
                a.b,
                a.model,
                a.data,
                a.fraction * 100.0,
                a.spearman,
                a.overlap * 100.0,
                a.plot
            ));
            for (n, size, rho, o) in &a.tensors {
                md.push_str(&format!(
                    "| `{n}` | {size} | {rho:.4} | {:.2}% |\n",
                    o * 100.0
                ));
            }
            md.push('\n');
        }
        if !self.data_pruned.is_empty() {
            md.push_str("## Data pruned\n\n| step | data | score | kept | per class (before → after) | indices |\n|---|---|---|---|---|---|\n");
            for d in &self.data_pruned {
                let score = match &d.model {
                    Some(m) => format!("{}({m}), {}", d.score, d.keep),
                    None => format!("{}()", d.score),
                };
                let classes: Vec<String> = d
                    .classes
                    .iter()
                    .enumerate()
                    .map(|(c, (b, a))| format!("{c}: {b} → {a}"))
                    .collect();
                md.push_str(&format!(
                    "| {} | {} | {score}{} | {} of {} ({:.2}%) | {} | `{}` |\n",
                    d.step,
                    d.data,
                    if d.per_class { ", per class" } else { "" },
                    d.kept.len(),
                    d.samples,
                    100.0 * d.kept.len() as f64 / d.samples.max(1) as f64,
                    classes.join(", "),
                    d.file
                ));
            }
            md.push('\n');
        }
        for a in &self.armor {
            let before: f64 = a.layers.iter().map(|l| l.1).sum();
            let after: f64 = a.layers.iter().map(|l| l.2).sum();
            md.push_str(&format!(
                "## ARMOR: step {} (`{}`)\n\nCalibration loss `‖(W − Ŵ) X‖²` summed over {} layers: {before:.4e} from the initial method, {after:.4e} after ARMOR ({:.1}% lower).\n\n",
                a.step,
                a.model,
                a.layers.len(),
                100.0 * (1.0 - after / before.max(f64::MIN_POSITIVE))
            ));
        }
        if !self.shrinks.is_empty() {
            md.push_str("## Units removed\n\n| model | line | unit | widths (before → after) | parameters |\n|---|---|---|---|---|\n");
            for s in &self.shrinks {
                let w: Vec<String> = s
                    .layers
                    .iter()
                    .map(|(n, b, a)| format!("{n} {b} → {a}"))
                    .collect();
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} → {} |\n",
                    s.model,
                    s.line,
                    s.unit,
                    w.join(", "),
                    s.params_before,
                    s.params_after
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
        if !self.dropped.is_empty() {
            md.push_str("## Not run\n\nDropped by dead-code elimination.\n\n| step | kind | line | why |\n|---|---|---|---|\n");
            for d in &self.dropped {
                let (line, _) = prunec_lang::diag::line_col(&self.source, d.span.start);
                md.push_str(&format!("| {} | {} | {line} | {} |\n", d.id, d.kind, d.why));
            }
            md.push('\n');
        }
        md
    }
}

/// Every param's resolved value, as JSON and as recipe text.
fn params_of(r: &CheckedRecipe) -> (BTreeMap<String, Json>, BTreeMap<String, String>) {
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
    (params, params_text)
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

/// An SVG document's opening tag.
fn svg_start(width: f64, height: f64) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    )
}

/// The oracle study's scatter plot: loss right after pruning (x) against
/// accuracy after retraining (y), one dot per candidate mask.
fn oracle_svg(a: &OracleStudy) -> String {
    let (pw, ph, x0, y0) = (420.0, 300.0, 70.0, 40.0);
    let mut svg = svg_start(pw + x0 + 30.0, ph + y0 + 60.0);
    svg.push_str(&format!(
        r#"<text x="{x0}" y="20" font-weight="bold">oracle study of {}: {} masks at {:.0}% of the {}s, Kendall tau-b = {:.3}</text>"#,
        xml_escape(&a.model),
        a.candidates.len(),
        a.fraction * 100.0,
        a.unit,
        a.kendall_tau
    ));
    svg.push_str(&format!(
        r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
    ));
    let range = |v: &mut dyn Iterator<Item = f64>| {
        let (lo, hi) = v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
        let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
        (lo - pad, hi + pad)
    };
    let (xl, xh) = range(&mut a.candidates.iter().map(|c| c.0));
    let (yl, yh) = range(&mut a.candidates.iter().map(|c| c.1 * 100.0));
    for (l, acc, _) in &a.candidates {
        let x = x0 + pw * (l - xl) / (xh - xl);
        let y = y0 + ph - ph * (acc * 100.0 - yl) / (yh - yl);
        svg.push_str(&format!(
            r##"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="#c0392b" fill-opacity="0.75"/>"##
        ));
    }
    svg.push_str(&format!(
        r#"<text x="{x0}" y="{}">loss on {} right after pruning: {xl:.3} .. {xh:.3}</text>"#,
        y0 + ph + 20.0,
        xml_escape(&a.data)
    ));
    svg.push_str(&format!(
        r#"<text x="12" y="{}" transform="rotate(-90 12 {})">accuracy on {} after retraining: {yl:.2} .. {yh:.2}%</text>"#,
        y0 + ph,
        y0 + ph,
        xml_escape(&a.test)
    ));
    svg.push_str("</svg>\n");
    svg
}

/// Sensitivity curves: accuracy against sparsity, one line per tensor.
fn sensitivity_svg(a: &SensitivityStudy) -> String {
    const COLORS: [&str; 6] = [
        "#c0392b", "#2e86c1", "#27ae60", "#8e44ad", "#d68910", "#555555",
    ];
    let (pw, ph, x0, y0) = (420.0, 280.0, 60.0, 40.0);
    let mut svg = svg_start(pw + x0 + 190.0, ph + y0 + 50.0);
    svg.push_str(&format!(
        r#"<text x="{x0}" y="20" font-weight="bold">sensitivity of {} to {}: accuracy on {} (dense {:.2}%)</text>"#,
        xml_escape(&a.model),
        xml_escape(&a.criterion),
        xml_escape(&a.data),
        a.dense.0 * 100.0
    ));
    svg.push_str(&format!(
        r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
    ));
    let points = a.tensors.iter().flat_map(|(_, per)| per.iter());
    let (xl, xh) = points
        .clone()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), p| {
            (l.min(p.0), h.max(p.0))
        });
    let (yl, yh) = points.fold((a.dense.0, a.dense.0), |(l, h), p| (l.min(p.1), h.max(p.1)));
    let (xs, ys) = ((xh - xl).max(1e-9), (yh - yl).max(1e-9));
    for (k, (n, per)) in a.tensors.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let pts: Vec<String> = per
            .iter()
            .map(|(s, acc, _)| {
                format!(
                    "{:.1},{:.1}",
                    x0 + pw * (s - xl) / xs,
                    y0 + ph - ph * (acc - yl) / ys
                )
            })
            .collect();
        svg.push_str(&format!(
            r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/><text x="{}" y="{}" fill="{color}">{}</text>"##,
            pts.join(" "),
            x0 + pw + 12.0,
            y0 + 14.0 + 16.0 * k as f64,
            xml_escape(n)
        ));
    }
    svg.push_str(&format!(
        r#"<text x="{x0}" y="{}">sparsity {:.0}% .. {:.0}%; accuracy {:.2}% .. {:.2}%</text>"#,
        y0 + ph + 20.0,
        xl * 100.0,
        xh * 100.0,
        yl * 100.0,
        yh * 100.0
    ));
    svg.push_str("</svg>\n");
    svg
}

/// A search's candidates: perplexity (y) against sparsity (x), every
/// candidate grey, uniform ones outlined, the Pareto front joined, its knee red.
fn search_svg(a: &SearchStudy) -> String {
    let (pw, ph, x0, y0) = (440.0, 300.0, 70.0, 40.0);
    let mut svg = svg_start(pw + x0 + 30.0, ph + y0 + 60.0);
    svg.push_str(&format!(
        r#"<text x="{x0}" y="20" font-weight="bold">search of {}: {} candidates, front of {} (dense perplexity {:.2})</text>"#,
        xml_escape(&a.model),
        a.candidates.len(),
        a.front.len(),
        a.dense_perplexity
    ));
    svg.push_str(&format!(
        r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
    ));
    let span = |v: &mut dyn Iterator<Item = f64>| {
        let (lo, hi) = v
            .filter(|x| x.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
                (a.min(x), b.max(x))
            });
        if lo > hi {
            return (0.0, 1.0);
        }
        let pad = if hi > lo { (hi - lo) * 0.05 } else { 0.5 };
        (lo - pad, hi + pad)
    };
    let (xl, xh) = span(&mut a.candidates.iter().map(|c| c.sparsity * 100.0));
    let (yl, yh) = span(&mut a.candidates.iter().map(|c| c.perplexity));
    let at = |p: &SearchPoint| {
        let y = if p.perplexity.is_finite() {
            p.perplexity.min(yh)
        } else {
            yh
        };
        (
            x0 + pw * (p.sparsity * 100.0 - xl) / (xh - xl),
            y0 + ph - ph * (y - yl) / (yh - yl),
        )
    };
    for c in &a.candidates {
        let (x, y) = at(c);
        let stroke = if c.uniform() {
            r##" stroke="#2e86c1" stroke-width="1.5""##
        } else {
            ""
        };
        svg.push_str(&format!(
            r##"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="#bbbbbb"{stroke}/>"##
        ));
    }
    let line: Vec<String> = a
        .front
        .iter()
        .map(|p| {
            let (x, y) = at(p);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    svg.push_str(&format!(
        r##"<polyline points="{}" fill="none" stroke="#333333" stroke-width="1.5"/>"##,
        line.join(" ")
    ));
    for (i, p) in a.front.iter().enumerate() {
        let (x, y) = at(p);
        let fill = if i == a.knee { "#c0392b" } else { "#333333" };
        svg.push_str(&format!(
            r##"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{fill}"/>"##
        ));
    }
    svg.push_str(&format!(
        r#"<text x="{x0}" y="{}">sparsity of the targeted weights: {xl:.1} .. {xh:.1}% (blue rings: uniform, red: knee)</text>"#,
        y0 + ph + 20.0
    ));
    svg.push_str(&format!(
        r#"<text x="12" y="{}" transform="rotate(-90 12 {})">perplexity on {}: {yl:.2} .. {yh:.2}</text>"#,
        y0 + ph,
        y0 + ph,
        xml_escape(&a.data)
    ));
    svg.push_str("</svg>\n");
    svg
}

/// Criterion agreement as bars: per tensor (and over all), Spearman's ρ on
/// [-1, 1] and the overlap on [0, 1].
fn agreement_svg(a: &AgreementStudy) -> String {
    let rows: Vec<(String, f64, f64)> = a
        .tensors
        .iter()
        .map(|(n, _, r, o)| (n.clone(), *r, *o))
        .chain(std::iter::once(("all".to_string(), a.spearman, a.overlap)))
        .collect();
    let (x0, bw, rh) = (160.0, 200.0, 22.0);
    let h = 60.0 + rh * rows.len() as f64;
    let mut svg = svg_start(x0 + 2.0 * bw + 80.0, h);
    svg.push_str(&format!(
        r#"<text x="10" y="20" font-weight="bold">{} vs {} on {}: Spearman rho (-1..1) and overlap at {:.0}% (0..1)</text>"#,
        xml_escape(&a.a),
        xml_escape(&a.b),
        xml_escape(&a.model),
        a.fraction * 100.0
    ));
    for (i, (n, rho, o)) in rows.iter().enumerate() {
        let y = 40.0 + rh * i as f64;
        let mid = x0 + bw / 2.0;
        let (from, to) = if *rho >= 0.0 {
            (mid, mid + rho * bw / 2.0)
        } else {
            (mid + rho * bw / 2.0, mid)
        };
        svg.push_str(&format!(
            r##"<text x="10" y="{:.1}">{}</text><rect x="{from:.1}" y="{y:.1}" width="{:.1}" height="14" fill="#2e86c1"/><line x1="{mid}" y1="{y:.1}" x2="{mid}" y2="{:.1}" stroke="#999"/><rect x="{:.1}" y="{y:.1}" width="{:.1}" height="14" fill="#c0392b"/><text x="{:.1}" y="{:.1}">{rho:.2} / {o:.2}</text>"##,
            y + 11.0,
            xml_escape(n),
            (to - from).max(0.5),
            y + 14.0,
            x0 + bw + 20.0,
            (o * bw).max(0.5),
            x0 + 2.0 * bw + 30.0,
            y + 11.0
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
    for a in &report.analyses {
        files.push((PathBuf::from(&a.plot), oracle_svg(a)));
    }
    for a in &report.agreements {
        files.push((PathBuf::from(&a.plot), agreement_svg(a)));
    }
    for a in &report.sensitivities {
        files.push((PathBuf::from(&a.plot), sensitivity_svg(a)));
    }
    for a in &report.searches {
        files.push((PathBuf::from(&a.plot), search_svg(a)));
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
    // Each data prune's kept indices, one per line (`numpy.loadtxt` reads them).
    for d in &report.data_pruned {
        let text = kept_text(&d.kept);
        std::fs::write(dir.join(&d.file), &text)?;
        report
            .outputs
            .push((d.file.clone(), sha256_hex(text.as_bytes())));
    }
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report.to_json()).unwrap() + "\n",
    )?;
    std::fs::write(dir.join("report.md"), report.to_markdown())?;
    let lock = json!({
        "prunec_version": env!("CARGO_PKG_VERSION"),
        "numerics": prunec_runtime::gemm::NUMERICS,
        "recipe": {"path": report.recipe_path, "sha256": report.recipe_sha256},
        "seed": report.seed,
        "params": report.params,
        "params_text": report.params_text,
        "inputs": report.inputs.iter().map(|(p, h)| json!({"path": p, "sha256": h})).collect::<Vec<_>>(),
        "outputs": report.outputs.iter().map(|(p, h)| json!({"path": p, "sha256": h})).collect::<Vec<_>>(),
        "data_pruned": report.data_pruned.iter().map(|d| json!({
            "step": d.step, "data": d.data, "samples": d.samples, "kept": d.kept.len(),
            "file": d.file, "indices_sha256": sha256_hex(kept_text(&d.kept).as_bytes()),
        })).collect::<Vec<_>>(),
    });
    let lock = serde_json::to_string_pretty(&lock).unwrap() + "\n";
    std::fs::write(dir.join("prune.lock"), &lock)?;
    // Exported Hugging Face folders carry the lock beside their recipe.
    for folder in &report.lock_copies {
        std::fs::write(dir.join(folder).join("prune.lock"), &lock)?;
    }
    Ok(())
}

/// Kept sample indices as a file: one decimal index per line.
fn kept_text(kept: &[u32]) -> String {
    let mut out = String::with_capacity(kept.len() * 6);
    for i in kept {
        out.push_str(&i.to_string());
        out.push('\n');
    }
    out
}

/// The process's peak resident memory (`VmHWM`), where the system reports it.
pub fn peak_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A sweep as the command line gave it: the swept params with their values
/// as written, and the `--set` overrides every variant shares.
pub struct SweepSpec {
    pub swept: Vec<(String, Vec<String>)>,
    pub set: Vec<(String, String)>,
}

/// One finished variant of a sweep.
pub struct SweepRow<'a> {
    pub name: &'a str,
    pub values: &'a [(String, String)],
    pub report: &'a Report,
}

/// The metrics of a variant the comparison shows: each evaluation's metrics
/// as `label.metric`, then the final sparsity and parameters kept.
fn sweep_metrics(r: &Report) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = Vec::new();
    for e in &r.evaluations {
        for (k, v) in &e.metrics {
            let key = format!("{}.{k}", e.label);
            match out.iter_mut().find(|(n, _)| *n == key) {
                // A label evaluated again (in rounds) shows its last value.
                Some(slot) => slot.1 = *v,
                None => out.push((key, *v)),
            }
        }
    }
    out.push(("final.sparsity".into(), r.final_sparsity));
    if let Some(c) = &r.counts {
        out.push(("final.params".into(), c.params_kept as f64));
    }
    out
}

/// A swept value as a number (`50%` is 0.5), if it is one.
fn swept_number(text: &str) -> Option<f64> {
    match text.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().ok().map(|v| v / 100.0),
        None => text.trim().parse::<f64>().ok(),
    }
}

/// One panel per metric against the first swept param (numeric axis when
/// every value is a number, evenly spaced otherwise); one line per value of
/// the other swept params.
fn sweep_svg(spec: &SweepSpec, rows: &[SweepRow<'_>], metrics: &[String]) -> String {
    let (pw, ph) = (300.0, 180.0);
    let cols = metrics.len().clamp(1, 3);
    let panels_down = metrics.len().div_ceil(3).max(1);
    let w = 40.0 + (pw + 60.0) * cols as f64;
    let h = 20.0 + (ph + 80.0) * panels_down as f64;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let Some((xname, xvalues)) = spec.swept.first() else {
        svg.push_str("</svg>\n");
        return svg;
    };
    let numeric: Option<Vec<f64>> = xvalues.iter().map(|v| swept_number(v)).collect();
    let xpos = |text: &str| -> f64 {
        let i = xvalues.iter().position(|v| v == text).unwrap_or(0);
        match &numeric {
            Some(nums) => {
                let (lo, hi) = nums
                    .iter()
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                        (a.min(*v), b.max(*v))
                    });
                if hi > lo {
                    (nums[i] - lo) / (hi - lo)
                } else {
                    0.5
                }
            }
            None if xvalues.len() > 1 => i as f64 / (xvalues.len() - 1) as f64,
            None => 0.5,
        }
    };
    // Series: the values of every swept param but the first.
    let series_of = |row: &SweepRow<'_>| -> String {
        row.values
            .iter()
            .skip(1)
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut series: Vec<String> = Vec::new();
    for row in rows {
        let s = series_of(row);
        if !series.contains(&s) {
            series.push(s);
        }
    }
    const COLORS: [&str; 6] = [
        "#c0392b", "#2c7fb8", "#27ae60", "#8e44ad", "#d35400", "#7f8c8d",
    ];
    for (k, m) in metrics.iter().enumerate() {
        let x0 = 40.0 + (pw + 60.0) * (k % 3) as f64;
        let y0 = 30.0 + (ph + 80.0) * (k / 3) as f64;
        svg.push_str(&format!(
            r#"<text x="{x0}" y="{}" font-weight="bold">{} against {}</text>"#,
            y0 - 10.0,
            xml_escape(m),
            xml_escape(xname)
        ));
        svg.push_str(&format!(
            r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
        ));
        let vals: Vec<f64> = rows
            .iter()
            .filter_map(|r| {
                sweep_metrics(r.report)
                    .into_iter()
                    .find(|(n, _)| n == m)
                    .map(|(_, v)| v)
            })
            .collect();
        if vals.is_empty() {
            continue;
        }
        let (lo, hi) = vals
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(*v), b.max(*v))
            });
        let span = if hi > lo { hi - lo } else { 1.0 };
        for (si, s) in series.iter().enumerate() {
            let color = COLORS[si % COLORS.len()];
            let mut pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| series_of(r) == *s)
                .filter_map(|r| {
                    let x = xpos(&r.values.first()?.1);
                    let v = sweep_metrics(r.report).into_iter().find(|(n, _)| n == m)?.1;
                    Some((
                        x0 + 10.0 + (pw - 20.0) * x,
                        y0 + ph - 10.0 - (ph - 20.0) * (v - lo) / span,
                    ))
                })
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let text: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            svg.push_str(&format!(
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                text.join(" ")
            ));
            for (x, y) in &pts {
                svg.push_str(&format!(
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#
                ));
            }
            if !s.is_empty() && k == 0 {
                svg.push_str(&format!(
                    r#"<text x="{}" y="{}" fill="{color}">{}</text>"#,
                    x0 + 10.0,
                    y0 + 15.0 + 14.0 * si as f64,
                    xml_escape(s)
                ));
            }
        }
        svg.push_str(&format!(
            r#"<text x="{x0}" y="{}">{lo:.4} .. {hi:.4}; {} = {}</text>"#,
            y0 + ph + 18.0,
            xml_escape(xname),
            xml_escape(&xvalues.join(", "))
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Writes a sweep's comparison (`sweep.md`, `sweep.json`, `sweep.svg`) and
/// its `prune.lock` into `dir`, beside the variants' folders. The lock lists
/// every variant's outputs (as `VARIANT/PATH`) and the plot, so that
/// `prunec verify` can replay the whole sweep.
pub fn write_sweep(
    dir: &Path,
    spec: &SweepSpec,
    rows: &[SweepRow<'_>],
    steps: &[Step],
) -> std::io::Result<()> {
    let Some(first) = rows.first() else {
        return Ok(());
    };
    let mut metrics: Vec<String> = Vec::new();
    for row in rows {
        for (m, _) in sweep_metrics(row.report) {
            if !metrics.contains(&m) {
                metrics.push(m);
            }
        }
    }
    // The plot is locked: timings, different on every run, stay out of it.
    let plotted: Vec<String> = metrics
        .iter()
        .filter(|m| {
            let name = m.rsplit('.').next().unwrap_or(m);
            !Metric::named(name).is_some_and(Metric::is_timing)
        })
        .cloned()
        .collect();
    let svg = sweep_svg(spec, rows, &plotted);
    std::fs::write(dir.join("sweep.svg"), &svg)?;
    // The comparison table.
    let mut md = format!(
        "# prunec sweep: `{}`\n\nRecipe `{}` (sha256 `{}`), seed {}; {} variants.\n\n",
        first.report.recipe_name,
        first.report.recipe_path,
        &first.report.recipe_sha256[..16],
        first.report.seed,
        rows.len()
    );
    let swept: Vec<&str> = spec.swept.iter().map(|(n, _)| n.as_str()).collect();
    md.push_str(&format!(
        "| variant | {} | {} | assert |\n|---|{}{}---|\n",
        swept.join(" | "),
        metrics.join(" | "),
        "---|".repeat(swept.len()),
        "---|".repeat(metrics.len())
    ));
    for row in rows {
        let vals = sweep_metrics(row.report);
        let cells: Vec<String> = metrics
            .iter()
            .map(|m| {
                vals.iter()
                    .find(|(n, _)| n == m)
                    .map(|(n, v)| fmt_metric(n.rsplit('.').next().unwrap_or(n), *v))
                    .unwrap_or_else(|| "-".into())
            })
            .collect();
        md.push_str(&format!(
            "| [{}]({}/report.md) | {} | {} | {} |\n",
            row.name,
            row.name,
            row.values
                .iter()
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
                .join(" | "),
            cells.join(" | "),
            row.report.failed_assert.as_deref().unwrap_or("holds")
        ));
    }
    md.push_str("\n![metrics against the swept value](sweep.svg)\n\n## Steps\n\nEach step ran once, for the variants listed.\n\n| step | kind | model | line | variants | seconds |\n|---|---|---|---|---|---|\n");
    for s in steps {
        let (line, _) = prunec_lang::diag::line_col(&first.report.source, s.span.start);
        md.push_str(&format!(
            "| {} | {} | {} | {line} | {} | {:.2} |\n",
            s.id,
            s.kind,
            s.model,
            s.variants.join(", "),
            s.seconds
        ));
    }
    std::fs::write(dir.join("sweep.md"), md)?;
    let json = json!({
        "prunec_version": env!("CARGO_PKG_VERSION"),
        "recipe": {"path": first.report.recipe_path, "sha256": first.report.recipe_sha256, "name": first.report.recipe_name},
        "swept": spec.swept.iter().map(|(n, v)| json!({"param": n, "values": v})).collect::<Vec<_>>(),
        "variants": rows.iter().map(|r| json!({
            "name": r.name,
            "values": r.values.iter().map(|(k, v)| (k.clone(), Json::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
            "metrics": sweep_metrics(r.report).into_iter().map(|(k, v)| (k, json!(v))).collect::<serde_json::Map<_, _>>(),
            "failed_assert": r.report.failed_assert,
        })).collect::<Vec<_>>(),
        "steps": steps.iter().map(|s| first.report.step_json(s)).collect::<Vec<_>>(),
    });
    std::fs::write(
        dir.join("sweep.json"),
        serde_json::to_string_pretty(&json).unwrap() + "\n",
    )?;
    let mut inputs: BTreeMap<&str, &str> = BTreeMap::new();
    let mut outputs: Vec<(String, String)> = Vec::new();
    for row in rows {
        inputs.extend(
            row.report
                .inputs
                .iter()
                .map(|(p, h)| (p.as_str(), h.as_str())),
        );
        outputs.extend(
            row.report
                .outputs
                .iter()
                .map(|(p, h)| (format!("{}/{p}", row.name), h.clone())),
        );
    }
    outputs.push(("sweep.svg".into(), sha256_hex(svg.as_bytes())));
    let lock = json!({
        "prunec_version": env!("CARGO_PKG_VERSION"),
        "numerics": prunec_runtime::gemm::NUMERICS,
        "recipe": {"path": first.report.recipe_path, "sha256": first.report.recipe_sha256},
        "seed": first.report.seed,
        "params_text": spec.set.iter().cloned().collect::<BTreeMap<_, _>>(),
        "sweep": spec.swept.iter().map(|(n, v)| json!({"param": n, "values": v})).collect::<Vec<_>>(),
        "inputs": inputs.iter().map(|(p, h)| json!({"path": p, "sha256": h})).collect::<Vec<_>>(),
        "outputs": outputs.iter().map(|(p, h)| json!({"path": p, "sha256": h})).collect::<Vec<_>>(),
    });
    std::fs::write(
        dir.join("prune.lock"),
        serde_json::to_string_pretty(&lock).unwrap() + "\n",
    )
}
