//! The executor: runs a checked recipe's pipeline on the runtime, pruning with
//! JIT-compiled kernels, and stages every output in a temporary folder that
//! is moved into place only when the run succeeds.

mod analyze;
mod data;
pub(crate) mod llm;
mod prune;
mod staging;
pub mod sweep;
mod units;

use crate::error::rt_err;
use crate::error::RunError;
use crate::lower;
use crate::plan::{Action, DataRef, Step};
use crate::report::{fmt_metric, Evaluation, Layer, Report, Round};
use crate::specs::{dataset_spec, model_spec};
use prunec_lang::ast::{BinaryOp, Expr, ExprKind, UnaryOp};
use prunec_lang::check::Value;
use prunec_lang::resolved::Metric;
use prunec_lang::{CheckedRecipe, Span};
use prunec_runtime as rt;
use rt::train::Control;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Batches whose gradients a gradient-reading criterion averages.
pub const GRADIENT_BATCHES: usize = 16;

/// Where and how to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Outputs go here (created if needed; existing files of the same name are replaced).
    pub out_dir: PathBuf,
    /// Show progress bars (stderr must be a terminal for them to draw).
    pub progress: bool,
    /// Also write the token windows each language-model stage calibrates on,
    /// as `calibration/<data set>.safetensors` (`input_ids`, `[samples, seq]`),
    /// so another tool can be given exactly the same calibration.
    pub save_calibration: bool,
}

/// What a successful (or assert-failed) run produced.
pub struct RunOutcome {
    pub report: Report,
    /// The `assert` that failed, if one did (outputs are still written).
    pub failed_assert: Option<(Span, String)>,
    /// Calibration windows written under `--save-calibration` (by data set).
    pub saved_calibrations: BTreeSet<String>,
}

struct ModelState {
    model: rt::Model,
    masks: rt::Masks,
    init: rt::Snapshot,
    spec: rt::ModelSpec,
    /// Epochs trained so far, over all stages.
    epochs_trained: usize,
    /// `rewind = epoch k` points some prune stage of the recipe needs, with
    /// the weights after `k` epochs once training got there.
    rewind_points: BTreeMap<usize, Option<rt::Snapshot>>,
    /// Activation norms from the last `calibrate` stage, by parameter.
    calibration: Option<BTreeMap<String, Vec<f32>>>,
    /// What a `Statistics` step computed for the prune step after it.
    stats: Option<prune::Stats>,
}

struct Exec<'a> {
    r: &'a CheckedRecipe,
    /// The epochs the plans of every sweep variant this state stands for
    /// rewind each model to (a shared training keeps those weights), and
    /// the variants' names, recorded on each step.
    rewinds: BTreeMap<String, BTreeSet<usize>>,
    variants: Vec<String>,
    device: candle_core::Device,
    models: BTreeMap<String, ModelState>,
    /// Loaded once and shared by every fork.
    datasets: BTreeMap<String, Arc<rt::Dataset>>,
    /// Latest value of each metric, and labelled evaluations.
    latest: BTreeMap<String, f64>,
    labels: BTreeMap<String, BTreeMap<String, f64>>,
    report: Report,
    inputs: BTreeMap<PathBuf, String>,
    staging: PathBuf,
    interrupted: Arc<AtomicBool>,
    progress: bool,
    /// `RunOptions::save_calibration`, and the data sets written so far.
    save_calibration: bool,
    saved_calibrations: BTreeSet<String>,
    /// The weights each model's last prune stage targeted, by model (sparsity
    /// and PQI are measured on them).
    targets: BTreeMap<String, Vec<String>>,
    /// When inside a round block, the round's metrics.
    round: Option<Round>,
    /// Language models, by name.
    llms: BTreeMap<String, rt::llm::LlamaModel>,
    /// Searched Pareto fronts, by the search stage's label.
    fronts: BTreeMap<String, crate::report::SearchStudy>,
    /// The `assert` that failed; the variant runs no further stage.
    failed_assert: Option<(Span, String)>,
    /// How each model's current state came about: its declaration, then
    /// every training stage (kind, data, resolved options); a stage that
    /// changes it otherwise makes it unique. Two models with the same
    /// history hold the same weights.
    lineage: BTreeMap<String, String>,
    /// The model whose state the current step copied instead of running.
    copied_from: Option<String>,
    /// The data sets pruned so far, with the step that pruned them last.
    data_lineage: BTreeMap<String, String>,
}

/// Untimed and timed forward passes of `latency` / `throughput`.
pub(super) const LATENCY_WARMUP: usize = 3;
pub(super) const LATENCY_RUNS: usize = 20;

/// Maps a language-model runtime error at a stage to a run error.
fn rt_err_llm(stage: Span, what: &str) -> impl Fn(rt::RuntimeError) -> RunError + '_ {
    move |e| RunError::user(stage, format!("{what}: {e}"))
}

/// The `Ctrl-C` flag, installed once per process.
fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        // If a handler cannot be installed, Ctrl-C simply kills the process;
        // outputs are still only renamed into place at the very end.
        let _ = ctrlc::set_handler(move || f.store(true, Ordering::SeqCst));
        flag
    })
    .clone()
}

/// Creates the output folder and a staging folder inside it, after removing
/// the staging folders that killed runs left there (not those of runs still
/// alive: see `exec/staging.rs`).
fn create_staging(out_dir: &Path) -> Result<staging::Staging, RunError> {
    std::fs::create_dir_all(out_dir).map_err(|e| RunError::User {
        span: None,
        message: format!("cannot create the output folder {}: {e}", out_dir.display()),
        help: Some("choose another folder with `--out DIR`".into()),
    })?;
    staging::remove_stale(out_dir);
    staging::Staging::create(out_dir).map_err(|e| RunError::User {
        span: None,
        message: format!(
            "cannot write in the output folder {}: {e}",
            out_dir.display()
        ),
        help: Some(
            "check its permissions and free space, or choose another with `--out DIR`".into(),
        ),
    })
}

/// Runs a checked recipe. Outputs are written to a staging folder inside
/// `opts.out_dir` and moved into place at the end; on any error the staging
/// folder is removed and the output folder holds no new file. Staging
/// folders that killed runs left in `opts.out_dir` are removed first.
pub fn run(
    recipe: &CheckedRecipe,
    recipe_path: &Path,
    recipe_text: &str,
    opts: &RunOptions,
) -> Result<RunOutcome, RunError> {
    let solo = sweep::Variant {
        name: String::new(),
        values: vec![],
        recipe,
    };
    let mut out = sweep::run_variants(&[solo], recipe_path, recipe_text, opts, &|_, _| Ok(()))?;
    Ok(out.variants.remove(0))
}

/// Runs the variants of a sweep into `opts.out_dir/<variant>/`, sharing the
/// work their prefixes have in common; `write_extra` writes the comparison
/// and the sweep's lock into the output folder. All or nothing, as `run`.
pub fn run_sweep(
    variants: &[sweep::Variant<'_>],
    recipe_path: &Path,
    recipe_text: &str,
    opts: &RunOptions,
    write_extra: &dyn Fn(&Path, &sweep::SweepOutcome) -> std::io::Result<()>,
) -> Result<sweep::SweepOutcome, RunError> {
    sweep::run_variants(variants, recipe_path, recipe_text, opts, write_extra)
}

impl<'a> Exec<'a> {
    fn new(
        r: &'a CheckedRecipe,
        rewinds: BTreeMap<String, BTreeSet<usize>>,
        variants: Vec<String>,
        recipe_path: &Path,
        recipe_text: &str,
        staging: PathBuf,
        opts: &RunOptions,
    ) -> Result<Self, RunError> {
        let ex = Exec {
            r,
            rewinds,
            variants,
            device: rt::DeviceSpec::Cpu
                .device()
                .map_err(|e| RunError::Internal(e.to_string()))?,
            models: BTreeMap::new(),
            datasets: BTreeMap::new(),
            latest: BTreeMap::new(),
            labels: BTreeMap::new(),
            report: Report::new(r, recipe_path, recipe_text),
            inputs: BTreeMap::new(),
            staging,
            interrupted: interrupt_flag(),
            progress: opts.progress,
            save_calibration: opts.save_calibration,
            saved_calibrations: BTreeSet::new(),
            targets: BTreeMap::new(),
            round: None,
            llms: BTreeMap::new(),
            fronts: BTreeMap::new(),
            failed_assert: None,
            lineage: BTreeMap::new(),
            data_lineage: BTreeMap::new(),
            copied_from: None,
        };
        ex.interrupted.store(false, Ordering::SeqCst);
        Ok(ex)
    }

    /// Points this state at another (group of) variant(s): the recipe it
    /// reads from now on, the report's params and where it writes.
    fn retarget(
        &mut self,
        r: &'a CheckedRecipe,
        rewinds: BTreeMap<String, BTreeSet<usize>>,
        variants: Vec<String>,
        staging: PathBuf,
    ) {
        self.r = r;
        self.rewinds = rewinds;
        self.variants = variants;
        self.staging = staging;
        self.report.set_params(r);
    }

    /// An independent copy of this state for other variants: models copied,
    /// data sets and language-model tensors (never written in place) shared.
    fn fork(
        &self,
        r: &'a CheckedRecipe,
        rewinds: BTreeMap<String, BTreeSet<usize>>,
        variants: Vec<String>,
        staging: PathBuf,
    ) -> Result<Self, RunError> {
        let mut models = BTreeMap::new();
        for (name, m) in &self.models {
            models.insert(
                name.clone(),
                ModelState {
                    model: m
                        .model
                        .fork()
                        .map_err(|e| RunError::Internal(format!("copying `{name}`: {e}")))?,
                    masks: m.masks.clone(),
                    init: m.init.clone(),
                    spec: m.spec.clone(),
                    epochs_trained: m.epochs_trained,
                    rewind_points: m.rewind_points.clone(),
                    calibration: m.calibration.clone(),
                    stats: m.stats.clone(),
                },
            );
        }
        let mut f = Exec {
            r: self.r,
            rewinds: BTreeMap::new(),
            variants: vec![],
            device: self.device.clone(),
            models,
            datasets: self.datasets.clone(),
            latest: self.latest.clone(),
            labels: self.labels.clone(),
            report: self.report.clone(),
            inputs: self.inputs.clone(),
            staging: PathBuf::new(),
            interrupted: self.interrupted.clone(),
            progress: self.progress,
            save_calibration: self.save_calibration,
            saved_calibrations: self.saved_calibrations.clone(),
            targets: self.targets.clone(),
            round: self.round.clone(),
            llms: self.llms.clone(),
            fronts: self.fronts.clone(),
            failed_assert: self.failed_assert.clone(),
            lineage: self.lineage.clone(),
            data_lineage: self.data_lineage.clone(),
            copied_from: None,
        };
        f.retarget(r, rewinds, variants, staging);
        Ok(f)
    }

    /// Ends a variant: the report's tables, then its plots, report and lock
    /// written into its staging folder.
    fn finish(mut self) -> Result<RunOutcome, RunError> {
        self.finish_report()?;
        let mut report = self.report;
        report.inputs = self
            .inputs
            .iter()
            .map(|(p, h)| (p.display().to_string(), h.clone()))
            .collect();
        report.failed_assert = self.failed_assert.as_ref().map(|(_, m)| m.clone());
        std::fs::create_dir_all(&self.staging)
            .and_then(|()| crate::report::write_all(&mut report, &self.staging))
            .map_err(|e| RunError::User {
                span: None,
                message: format!("cannot write the report: {e}"),
                help: None,
            })?;
        Ok(RunOutcome {
            report,
            failed_assert: self.failed_assert,
            saved_calibrations: self.saved_calibrations,
        })
    }
}

/// Moves every file of `staging` (recursively) into `out`, each by an atomic rename.
fn publish(staging: &Path, out: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(staging)? {
        let entry = entry?;
        let target = out.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&target)?;
            publish(&entry.path(), &target)?;
        } else {
            // Temporary files are created private; outputs get ordinary permissions.
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o644))?;
            }
            std::fs::rename(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The hook of a training stage: progress, Ctrl-C, late-rewinding snapshots
/// and, for `prune ... during train ...`, gradual pruning.
struct StageHook<'a, 'g> {
    flag: Arc<AtomicBool>,
    bar: Option<indicatif::ProgressBar>,
    gradual: Option<&'g mut prune::Gradual>,
    /// Forgetting events counted over the presentations (`prune DATA by
    /// forgetting(...) during train ...`).
    forgetting: Option<&'g mut rt::datascore::Forgetting>,
    init: &'a rt::Snapshot,
    /// Calibration data of a gradual criterion that reads `act(x)`.
    calib: Option<&'a rt::Dataset>,
    /// Full epochs this model trained in earlier stages, and in this one so far.
    epochs_before: usize,
    epochs_done: usize,
    /// Epoch counts whose weights a later `rewind = epoch k` needs.
    rewind_points: &'a mut BTreeMap<usize, Option<rt::Snapshot>>,
}

impl rt::TrainHooks for StageHook<'_, '_> {
    fn on_gradients(
        &mut self,
        info: &rt::StepInfo,
        model: &rt::Model,
        grads: &[(String, candle_core::Tensor)],
    ) -> rt::Result<()> {
        if let Some(g) = self.gradual.as_deref_mut() {
            g.on_gradients(info.step, model, grads)?;
        }
        Ok(())
    }

    fn after_step(&mut self, info: &rt::StepInfo, _model: &rt::Model) -> rt::Result<Control> {
        if let Some(b) = &self.bar {
            b.set_position(info.step as u64 + 1);
            let sparsity = self
                .gradual
                .as_ref()
                .and_then(|g| g.applied.last())
                .map(|a| format!(", sparsity {:.1}%", a.sparsity * 100.0))
                .unwrap_or_default();
            b.set_message(format!("loss {:.4}{sparsity}", info.loss));
        }
        Ok(if self.flag.load(Ordering::SeqCst) {
            Control::Stop
        } else {
            Control::Continue
        })
    }

    fn update_masks(
        &mut self,
        info: &rt::StepInfo,
        model: &rt::Model,
        masks: &mut rt::Masks,
    ) -> rt::Result<bool> {
        match self.gradual.as_deref_mut() {
            Some(g) => g.update_masks(info, model, masks, self.init, self.calib),
            None => Ok(false),
        }
    }

    /// Gradual pruning reads gradients and weights at its steps; progress
    /// and Ctrl-C need neither.
    fn reads_every_step(&self) -> bool {
        self.gradual.is_some()
    }

    fn reads_predictions(&self) -> bool {
        self.forgetting.is_some()
    }

    fn on_predictions(
        &mut self,
        _info: &rt::StepInfo,
        samples: &[u32],
        correct: &[bool],
    ) -> rt::Result<()> {
        if let Some(f) = self.forgetting.as_deref_mut() {
            f.observe(samples, correct);
        }
        Ok(())
    }

    fn soft_mask(&mut self, step: usize) -> Option<rt::train::SoftMask> {
        self.gradual.as_deref().and_then(|g| g.soft_mask(step))
    }

    fn after_epoch(&mut self, epoch: usize, model: &rt::Model) -> rt::Result<Control> {
        self.epochs_done = epoch + 1;
        let done = self.epochs_before + epoch + 1;
        if let Some(slot @ None) = self.rewind_points.get_mut(&done) {
            *slot = Some(model.snapshot()?);
        }
        Ok(Control::Continue)
    }
}

impl Exec<'_> {
    /// A resolved option of the step (the plan carries every option a
    /// stage's run reads).
    fn option(&self, step: &Step, key: &str) -> Option<Value> {
        step.options.get(key).cloned()
    }

    /// A declared value by name (following `Ref`s).
    fn declared(&self, name: &str) -> Option<&Value> {
        self.r.symbols.get(name).and_then(|s| s.value.as_ref())
    }

    /// The model a step reads or changes, and where its name is written.
    fn subject_name(step: &Step) -> Result<(String, Span), RunError> {
        let name = step
            .model
            .clone()
            .ok_or_else(|| RunError::Internal(format!("step {} has no model", step.id)))?;
        Ok((name, step.site.subject))
    }

    /// The data set a step's `on` clause names.
    fn on_data(step: &Step) -> Result<&DataRef, RunError> {
        step.on
            .as_ref()
            .ok_or_else(|| RunError::user(step.site.keyword, "no data"))
    }

    /// Runs one plan step: what it does, every option, the data it reads
    /// and where to report errors all come from the step.
    fn step(&mut self, step: &Step) -> Result<(), RunError> {
        let t0 = Instant::now();
        if let Some(name) = step.model.as_deref().filter(|m| self.is_llm(m)) {
            self.llm_stage(step, name, step.site.subject)?;
            self.push_step(step, t0);
            return Ok(());
        }
        match &step.action {
            Action::Train { .. } => {
                if !self.train_from_twin(step)? {
                    self.train(step)?
                }
            }
            Action::Calibrate { .. } | Action::Prune(_) => {
                // The state (mask, statistics) is this model's own from now
                // on (built first, so its declaration does not overwrite it).
                if let Some(name) = &step.model {
                    self.model(name, step.site.subject)?;
                    self.lineage
                        .insert(name.clone(), format!("{name} after step {}", step.id));
                }
                match &step.action {
                    Action::Prune(p) => self.prune(step, p)?,
                    _ => self.calibrate(step)?,
                }
            }
            Action::PruneData(d) => self.prune_data(step, d)?,
            Action::Analyze(a) => self.analyze(step, a)?,
            Action::Statistics {
                for_step,
                gradients,
                activations,
            } => {
                let name = step.model.clone().unwrap_or_default();
                self.statistics(
                    step,
                    for_step,
                    &name,
                    gradients.as_deref(),
                    activations.as_deref(),
                )?
            }
            Action::Evaluate { metrics, label, .. } => {
                self.evaluate(step, metrics, label.as_deref())?
            }
            Action::Assert { condition } => {
                // A failed assert ran too: it shows among the steps.
                let held = self.assert(&condition.expr);
                if held.is_err() {
                    self.push_step(step, t0);
                }
                held?
            }
            Action::Export { .. } => self.export(step)?,
            Action::Report { metrics, path } => {
                if let Some(p) = path {
                    self.report.plots.push((PathBuf::from(p), metrics.clone()));
                }
            }
        }
        self.push_step(step, t0);
        Ok(())
    }

    /// Records a step that ran, with the variants that share it.
    fn push_step(&mut self, step: &Step, t0: Instant) {
        self.report.steps.push(crate::report::Step {
            id: step.id.clone(),
            kind: match step.action {
                Action::Statistics { .. } => "statistics".to_string(),
                _ => step.site.kind.keyword().to_string(),
            },
            model: step.model.clone().unwrap_or_default(),
            data: match &step.action {
                Action::PruneData(d) => Some(d.data.clone()),
                _ => None,
            },
            span: step.span,
            variants: self.variants.clone(),
            seconds: t0.elapsed().as_secs_f64(),
            copied_from: self.copied_from.take(),
        });
    }

    /// A training stage whose result another model already holds (declared
    /// the same way and trained the same way so far, as the two copies of
    /// `examples/global_mp_keepmin.prune`) copies that model's state instead
    /// of training again: the same weights, bit for bit. True when it did.
    fn train_from_twin(&mut self, step: &Step) -> Result<bool, RunError> {
        let (name, span) = Self::subject_name(step)?;
        self.model(&name, span)?;
        let on = step.on.as_ref().map(|d| d.name.clone());
        // A teacher's state is an input too: its own history joins the key.
        let teacher = match step.options.get("distill") {
            Some(Value::Ref(t)) => format!(
                " from {t} = [{}]",
                self.lineage.get(t).map_or("", |l| l.as_str())
            ),
            _ => String::new(),
        };
        // A data set pruned earlier in the run is other data.
        let version = on
            .as_ref()
            .and_then(|d| self.data_lineage.get(d))
            .map_or(String::new(), |v| format!(" ({v})"));
        let key = format!(
            "{} | {} on {:?}{version} with {:?}{teacher}",
            self.lineage[&name], step.site.kind, on, step.options
        );
        let twin = self
            .lineage
            .iter()
            .find(|(m, l)| **m != name && **l == key)
            .map(|(m, _)| m.clone());
        self.lineage.insert(name.clone(), key);
        let Some(twin) = twin else { return Ok(false) };
        let (from, to) = (&self.models[&twin], &self.models[&name]);
        // The snapshots a later rewind of this model needs must be there too.
        if !from.rewind_points.keys().eq(to.rewind_points.keys()) {
            return Ok(false);
        }
        let model = from
            .model
            .fork()
            .map_err(|e| RunError::Internal(format!("copying `{twin}`: {e}")))?;
        let copy = ModelState {
            model,
            masks: from.masks.clone(),
            init: to.init.clone(),
            spec: to.spec.clone(),
            epochs_trained: from.epochs_trained,
            rewind_points: from.rewind_points.clone(),
            calibration: from.calibration.clone(),
            // Statistics belong to the step they were computed for.
            stats: None,
        };
        self.models.insert(name, copy);
        self.copied_from = Some(twin);
        Ok(true)
    }

    fn model(&mut self, name: &str, span: Span) -> Result<&mut ModelState, RunError> {
        if !self.models.contains_key(name) {
            let value = self
                .declared(name)
                .cloned()
                .ok_or_else(|| RunError::user(span, format!("`{name}` is not a model")))?;
            let spec = model_spec(&value, span)?;
            let model = spec
                .build(self.r.seed, &self.device)
                .map_err(rt_err(span, "cannot build the model"))?;
            if let Some(file) = spec.weights_file() {
                self.hash_input(file, span)?;
            }
            let init = model.snapshot().map_err(rt_err(span, "snapshot"))?;
            self.lineage
                .insert(name.to_string(), format!("{value:?} seed {}", self.r.seed));
            self.models.insert(
                name.to_string(),
                ModelState {
                    model,
                    masks: rt::Masks::new(),
                    init,
                    spec,
                    epochs_trained: 0,
                    rewind_points: self
                        .rewinds
                        .get(name)
                        .into_iter()
                        .flatten()
                        .map(|&k| (k, None))
                        .collect(),
                    calibration: None,
                    stats: None,
                },
            );
        }
        Ok(self.models.get_mut(name).unwrap())
    }

    /// A declared data set, loaded on first use (`span`: where it is read).
    fn dataset_named(&mut self, name: &str, span: Span) -> Result<Arc<rt::Dataset>, RunError> {
        if !self.datasets.contains_key(name) {
            let v = self
                .declared(name)
                .cloned()
                .ok_or_else(|| RunError::user(span, format!("`{name}` is not a dataset")))?;
            let spec = self.dataset_spec(&v, span)?;
            let data = spec
                .load(&self.device)
                .map_err(rt_err(span, &format!("cannot load the data set `{name}`")))?;
            let names = &data.meta().class_names;
            if !names.is_empty() {
                self.report.classes.insert(name.to_string(), names.clone());
            }
            self.datasets.insert(name.to_string(), Arc::new(data));
        }
        Ok(self.datasets[name].clone())
    }

    fn dataset_spec(&mut self, v: &Value, span: Span) -> Result<rt::DatasetSpec, RunError> {
        let (spec, files) = dataset_spec(v, self.r.seed, span)?;
        for f in files {
            self.hash_input(&f, span)?;
        }
        Ok(spec)
    }

    fn hash_input(&mut self, path: &Path, span: Span) -> Result<(), RunError> {
        if !self.inputs.contains_key(path) {
            let h = rt::io::sha256_file(path).map_err(rt_err(span, "cannot read an input"))?;
            self.inputs.insert(path.to_path_buf(), h);
        }
        Ok(())
    }

    /// The training a stage's options ask for (`epochs` or `steps`,
    /// `optimizer`, `lr_schedule`), over data of `batches` batches.
    fn train_config(&self, step: &Step, batches: usize) -> rt::TrainConfig {
        let epochs = self
            .option(step, "epochs")
            .and_then(|v| v.as_i64())
            .unwrap_or(1)
            .max(1) as usize;
        let steps = self.option(step, "steps").and_then(|v| v.as_i64());
        let opt = self.option(step, "optimizer").unwrap_or(Value::Call {
            name: "sgd".into(),
            args: vec![
                ("lr".into(), Value::Float(0.01)),
                ("momentum".into(), Value::Float(0.0)),
                ("weight_decay".into(), Value::Float(0.0)),
                ("nesterov".into(), Value::Bool(false)),
            ],
        });
        let f = |k: &str, d: f64| opt.arg(k).and_then(|x| x.as_f64()).unwrap_or(d);
        let optimizer = match opt.call_name() {
            Some("adam") => rt::OptimizerSpec::Adam {
                lr: f("lr", 1e-3),
                beta1: f("beta1", 0.9),
                beta2: f("beta2", 0.999),
                eps: f("eps", 1e-8),
                weight_decay: f("weight_decay", 0.0),
            },
            Some("adamw") => rt::OptimizerSpec::AdamW {
                lr: f("lr", 1e-3),
                beta1: f("beta1", 0.9),
                beta2: f("beta2", 0.999),
                eps: f("eps", 1e-8),
                weight_decay: f("weight_decay", 0.01),
            },
            _ => rt::OptimizerSpec::Sgd {
                lr: f("lr", 0.01),
                momentum: f("momentum", 0.0),
                weight_decay: f("weight_decay", 0.0),
                nesterov: matches!(opt.arg("nesterov"), Some(Value::Bool(true))),
            },
        };
        let mut cfg = rt::TrainConfig::new(epochs, optimizer);
        if let Some(st) = steps {
            cfg = cfg.max_steps(st.max(1) as usize);
            cfg.epochs = (st.max(1) as usize).div_ceil(batches.max(1));
        }
        if let Some(lr) = self.option(step, "lr_schedule") {
            let steps_of = |v: Option<&Value>| match v {
                Some(Value::Duration {
                    count,
                    unit: prunec_lang::ast::Unit::Epoch,
                }) => *count as usize * batches,
                Some(other) => other.as_i64().unwrap_or(0).max(0) as usize,
                None => 0,
            };
            match lr.call_name() {
                Some("cosine") => {
                    cfg = cfg
                        .schedule(rt::LrSchedule::Cosine { min_lr: 0.0 })
                        .warmup(steps_of(lr.arg("warmup")));
                }
                Some("step_decay") => {
                    // `every` in steps (`N epochs` counts the stage's batches).
                    cfg = cfg.schedule(rt::LrSchedule::Step {
                        every_steps: steps_of(lr.arg("every")).max(1),
                        gamma: lr.arg("gamma").and_then(|g| g.as_f64()).unwrap_or(0.1),
                    });
                }
                _ => {}
            }
        }
        cfg
    }

    fn train(&mut self, step: &Step) -> Result<(), RunError> {
        self.train_with(step, None, None)
    }

    /// Runs a `train` / `finetune` stage; `gradual` prunes during it.
    fn train_with(
        &mut self,
        step: &Step,
        mut gradual: Option<&mut prune::Gradual>,
        forgetting: Option<&mut rt::datascore::Forgetting>,
    ) -> Result<(), RunError> {
        let (name, span) = Self::subject_name(step)?;
        let on = Self::on_data(step)?;
        self.dataset_named(&on.name, on.span)?;
        let data_name = on.name.clone();
        let batches = self.datasets[&data_name].num_batches();
        let cfg = self.train_config(step, batches);
        let reinit = matches!(self.option(step, "reinit"), Some(Value::Bool(true)));
        let seed = self.r.seed;
        let device = self.device.clone();
        let state = self.model(&name, span)?;
        if reinit {
            // Scratch-E: fresh weights from a different seed, the mask kept,
            // at the model's current widths (also for a model read from a
            // file, whose weights are not what "fresh" means).
            let spec = state.spec.fresh(state.model.architecture().clone());
            let fresh = spec
                .build(seed.wrapping_add(0x5eed), &device)
                .map_err(rt_err(span, "re-initialise"))?;
            let snap = fresh.snapshot().map_err(rt_err(span, "re-initialise"))?;
            state
                .model
                .restore(&snap)
                .map_err(rt_err(span, "re-initialise"))?;
            state
                .masks
                .apply(&state.model)
                .map_err(rt_err(span, "re-initialise"))?;
        }
        let bar = self.progress.then(|| {
            let b = indicatif::ProgressBar::new(cfg.total_steps(&self.datasets[&data_name]) as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} steps, eta {eta} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(format!("{} {name}", step.site.kind));
            b
        });
        let total = cfg.total_steps(&self.datasets[&data_name]);
        if let Some(g) = gradual.as_deref_mut() {
            g.make_plan(batches, total)?;
            if let Some(c) = g.calib.clone() {
                self.dataset_named(&c.name, c.span)?;
            }
        }
        // The teacher in its current state (a clone shares its variables; it
        // is only read).
        let teacher = match self.option(step, "distill") {
            Some(Value::Ref(t)) => {
                let tspan = step.span;
                self.model(&t, tspan)?;
                Some(self.models[&t].model.clone())
            }
            _ => None,
        };
        let f64_option = |k: &str| {
            self.option(step, k)
                .and_then(|v| v.as_f64())
                .or_else(|| prunec_lang::builtins::default_number(k, None))
                .ok_or_else(|| RunError::Internal(format!("no value for `{k}`")))
        };
        let (temperature, weight) = (f64_option("temperature")?, f64_option("distill_weight")?);
        let state = self.models.get_mut(&name).unwrap();
        let ModelState {
            model,
            masks,
            init,
            rewind_points,
            epochs_trained,
            ..
        } = state;
        let calib = gradual
            .as_ref()
            .and_then(|g| g.calib.as_ref())
            .map(|c| &*self.datasets[&c.name]);
        let mut hooks = StageHook {
            flag: self.interrupted.clone(),
            bar,
            gradual,
            forgetting,
            init,
            calib,
            epochs_before: *epochs_trained,
            epochs_done: 0,
            rewind_points,
        };
        let data = &self.datasets[&data_name];
        let distill = teacher.as_ref().map(|teacher| rt::train::Distill {
            teacher,
            temperature,
            weight,
        });
        let result =
            rt::train::train_distilled(model, data, &cfg, masks, &mut hooks, distill.as_ref());
        if let Some(b) = &hooks.bar {
            b.finish_and_clear();
        }
        if let Some(e) = hooks.gradual.as_mut().and_then(|g| g.error.take()) {
            return Err(e);
        }
        match result {
            // Full epochs only: a run cut short by `steps` ends mid-epoch.
            Ok(_) => *epochs_trained += hooks.epochs_done,
            Err(rt::RuntimeError::Diverged {
                epoch,
                step: at,
                loss,
            }) => {
                return Err(RunError::User {
                    span: Some(step.span),
                    message: format!(
                    "training `{name}` diverged at epoch {epoch}, step {at}: the loss is {loss}"
                ),
                    help: Some("lower the learning rate".into()),
                })
            }
            Err(e) => return Err(rt_err(step.span, "training failed")(e)),
        }
        if self.interrupted.load(Ordering::SeqCst) {
            return Err(RunError::Interrupted);
        }
        Ok(())
    }

    /// Names of the weights a prune stage targets.
    fn select_params(&self, step: &Step, model: &rt::Model) -> Result<Vec<String>, RunError> {
        let targets = match self.option(step, "targets") {
            Some(v) => lower::strings(Some(&v)),
            None => vec!["*.weight".to_string()],
        };
        let skip = lower::strings(self.option(step, "skip").as_ref());
        let names: Vec<String> = model
            .names()
            .into_iter()
            .filter(|n| {
                targets.iter().any(|t| lower::glob_match(t, n))
                    && !skip.iter().any(|k| lower::glob_match(k, n))
            })
            .map(String::from)
            .collect();
        if names.is_empty() {
            let span = step.site.targets.unwrap_or(step.site.keyword);
            return Err(RunError::User {
                span: Some(span),
                message: format!(
                    "the targets {targets:?} (minus skip {skip:?}) match no parameter of the model"
                ),
                help: Some(format!("its parameters are: {}", model.names().join(", "))),
            });
        }
        Ok(names)
    }

    /// Sparsity and PQI over the targeted weights (all weights before any prune).
    fn sparsity_pqi(&self, model: &str, span: Span) -> Result<(f64, f64), RunError> {
        let state = &self.models[model];
        let targets = self.targets.get(model);
        // Before any prune: every weight. ONNX initializers are named by the
        // exporter (`onnx::MatMul_12`), so there the graph's layer weights.
        let layer_weights: Option<Vec<String>> = state.model.onnx_graph().map(|_| {
            state
                .model
                .layer_costs()
                .iter()
                .map(|c| c.weight.clone())
                .collect()
        });
        let select = |n: &str| match (targets, &layer_weights) {
            (Some(t), _) => t.iter().any(|x| x == n),
            (None, Some(w)) => w.iter().any(|x| x == n),
            (None, None) => n.ends_with(".weight"),
        };
        let sp =
            rt::eval::model_sparsity(&state.model, select).map_err(rt_err(span, "sparsity"))?;
        let (_, pqi) =
            rt::eval::model_pqi(&state.model, 0.5, 1.0, select).map_err(rt_err(span, "pqi"))?;
        Ok((sp.total, pqi))
    }

    /// Loads a step's model and its `on` data; their names.
    fn model_and_data(&mut self, step: &Step) -> Result<(String, String), RunError> {
        let (name, span) = Self::subject_name(step)?;
        let on = Self::on_data(step)?;
        self.dataset_named(&on.name, on.span)?;
        self.model(&name, span)?;
        Ok((name, on.name.clone()))
    }

    fn evaluate(
        &mut self,
        step: &Step,
        wanted: &[Metric],
        label: Option<&str>,
    ) -> Result<(), RunError> {
        let s = &step.site;
        let (name, data_name) = self.model_and_data(step)?;
        let needs_eval = wanted
            .iter()
            .any(|m| matches!(m, Metric::Accuracy | Metric::Loss));
        let measured = match needs_eval {
            true => Some(
                rt::evaluate(&self.models[&name].model, &self.datasets[&data_name])
                    .map_err(rt_err(step.span, "evaluation failed"))?,
            ),
            false => None,
        };
        let timed = match wanted.iter().any(|m| m.is_timing()) {
            true => Some(
                rt::eval::forward_latency(
                    &self.models[&name].model,
                    &self.datasets[&data_name],
                    LATENCY_WARMUP,
                    LATENCY_RUNS,
                )
                .map_err(rt_err(step.span, "timing the forward pass failed"))?,
            ),
            false => None,
        };
        let (sparsity, pqi) = self.sparsity_pqi(&name, step.span)?;
        let counts = rt::eval::model_counts(&self.models[&name].model)
            .map_err(rt_err(step.span, "counts"))?;
        let mut out = BTreeMap::new();
        for &m in wanted {
            let v = match (m, &measured) {
                (Metric::Accuracy, Some(e)) => e.accuracy,
                (Metric::Loss, Some(e)) => e.loss,
                (Metric::Sparsity, _) => sparsity,
                (Metric::Pqi, _) => pqi,
                (Metric::Params, _) => counts.params_kept as f64,
                (Metric::Flops, _) => counts.flops_kept as f64,
                (Metric::Latency, _) if timed.is_some() => {
                    timed.map_or(0.0, |(secs, _)| secs * 1e3)
                }
                (Metric::Throughput, _) if timed.is_some() => {
                    timed.map_or(0.0, |(secs, batch)| batch as f64 / secs.max(1e-12))
                }
                (other, _) => {
                    return Err(RunError::user(
                        s.out.unwrap_or(step.span),
                        format!("`{other}` cannot be measured on this model"),
                    ));
                }
            };
            out.insert(m.as_str().to_string(), v);
        }
        self.record_evaluation(step.span, label, &name, &data_name, out);
        if let (Some(e), Some(last)) = (&measured, self.report.evaluations.last_mut()) {
            last.predictions_sha256 = Some(
                e.predictions_sha256
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
            );
        }
        Ok(())
    }

    /// Records an evaluation: latest values, its label, the current round, the report.
    fn record_evaluation(
        &mut self,
        span: Span,
        label: Option<&str>,
        model: &str,
        data: &str,
        out: BTreeMap<String, f64>,
    ) {
        for (k, v) in &out {
            self.latest.insert(k.clone(), *v);
        }
        if let Some(l) = label {
            self.labels.insert(l.to_string(), out.clone());
        }
        if let Some(r) = &mut self.round {
            r.metrics.extend(out.clone());
        }
        let label = label
            .map(String::from)
            .unwrap_or_else(|| format!("{model} on {data}"));
        if self.progress {
            let shown: Vec<String> = out
                .iter()
                .map(|(k, v)| format!("{k} = {}", fmt_metric(k, *v)))
                .collect();
            eprintln!("evaluate {label}: {}", shown.join(", "));
        }
        self.report.evaluations.push(Evaluation {
            label,
            span,
            metrics: out,
            predictions_sha256: None,
            kv_cache: None,
        });
    }

    /// The value of an assert operand (the one constant evaluator, with
    /// names resolved to params, then to the latest metrics, and
    /// `label.metric` to labelled evaluations).
    fn number(&self, e: &Expr) -> Result<f64, RunError> {
        let mut leaf = |x: &Expr| -> Result<f64, RunError> {
            match &x.kind {
                ExprKind::Name(id) => match self.r.param(&id.name).and_then(|v| v.as_f64()) {
                    Some(v) => Ok(v),
                    None => self.latest.get(&id.name).copied().ok_or_else(|| {
                        RunError::user(id.span, format!("`{}` has not been evaluated", id.name))
                    }),
                },
                ExprKind::Member { base, member } => {
                    let label = base.as_name().map(|n| n.name.clone()).unwrap_or_default();
                    self.labels
                        .get(&label)
                        .and_then(|m| m.get(&member.name))
                        .copied()
                        .ok_or_else(|| {
                            RunError::user(
                                x.span,
                                format!("`{label}.{}` has not been evaluated", member.name),
                            )
                        })
                }
                _ => Err(RunError::user(x.span, "not a number")),
            }
        };
        prunec_lang::eval::number(e, &mut leaf).map_err(|err| match err {
            prunec_lang::eval::EvalError::NotNumeric(span) => RunError::user(span, "not a number"),
            prunec_lang::eval::EvalError::Lookup(e) => e,
        })
    }

    fn truth(&self, e: &Expr, values: &mut Vec<String>) -> Result<bool, RunError> {
        Ok(match &e.kind {
            ExprKind::Paren(inner) => self.truth(inner, values)?,
            ExprKind::Unary {
                op: UnaryOp::Not,
                operand,
            } => !self.truth(operand, values)?,
            ExprKind::Binary {
                op: BinaryOp::And,
                lhs,
                rhs,
            } => self.truth(lhs, values)? & self.truth(rhs, values)?,
            ExprKind::Binary {
                op: BinaryOp::Or,
                lhs,
                rhs,
            } => self.truth(lhs, values)? | self.truth(rhs, values)?,
            ExprKind::Binary { op, lhs, rhs } => {
                let (a, b) = (self.number(lhs)?, self.number(rhs)?);
                for (side, v) in [(lhs, a), (rhs, b)] {
                    if !matches!(
                        side.kind,
                        ExprKind::Number { .. } | ExprKind::Percent { .. }
                    ) {
                        values.push(format!("{} = {}", prunec_lang::fmt::expr(side), v));
                    }
                }
                prunec_lang::eval::compare(*op, a, b)
                    .ok_or_else(|| RunError::user(e.span, "not a condition"))?
            }
            _ => return Err(RunError::user(e.span, "not a condition")),
        })
    }

    fn assert(&mut self, cond: &Expr) -> Result<(), RunError> {
        let mut values = Vec::new();
        if !self.truth(cond, &mut values)? {
            return Err(RunError::Assert {
                span: cond.span,
                message: format!(
                    "assertion failed: {} (with {})",
                    prunec_lang::fmt::expr(cond),
                    values.join(", ")
                ),
            });
        }
        Ok(())
    }

    /// An export stage's path: relative, inside the output folder; returns
    /// it, its place in the staging folder (parent folders created) and the
    /// span of the `to` clause.
    fn export_target(&self, step: &Step) -> Result<(PathBuf, PathBuf, Span), RunError> {
        let (Action::Export { path }, Some(span)) = (&step.action, step.site.to) else {
            return Err(RunError::Internal(format!(
                "step {} exports nothing",
                step.id
            )));
        };
        let rel = PathBuf::from(path);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(RunError::User {
                span: Some(span),
                message: "export paths are relative to the output folder and stay inside it".into(),
                help: Some("write a relative path such as \"model.safetensors\"; choose the folder with `--out DIR`".into()),
            });
        }
        let path = self.staging.join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                RunError::user(span, format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        Ok((rel, path, span))
    }

    fn export(&mut self, step: &Step) -> Result<(), RunError> {
        let (name, span) = Self::subject_name(step)?;
        let (rel, path, to_span) = self.export_target(step)?;
        self.model(&name, span)?;
        // An ONNX graph is written back as itself; other classifiers as safetensors.
        let onnx = self.models[&name].model.onnx_graph().is_some();
        let format = self
            .option(step, "format")
            .and_then(|f| f.as_str().map(String::from));
        match (format.as_deref(), onnx) {
            (None | Some("onnx"), true) | (None | Some("safetensors"), false) => {}
            (Some(f), _) => {
                return Err(RunError::Internal(format!(
                    "`format = {f}` reached the export of `{name}`: the checker rejects it"
                )));
            }
        }
        let inputs: Vec<&Path> = self.inputs.keys().map(|p| p.as_path()).collect();
        let model = &self.models[&name].model;
        let saved = if onnx {
            model.save_onnx(&path, &inputs)
        } else {
            model.save(&path, &inputs)
        };
        let hash = saved.map_err(rt_err(to_span, "export failed"))?;
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let format = if onnx { "onnx" } else { "safetensors" };
        self.report
            .exports
            .push((rel.display().to_string(), format.into(), bytes));
        self.report.outputs.push((rel.display().to_string(), hash));
        self.report.exported.get_or_insert(name);
        Ok(())
    }

    /// Fills the per-layer table and the final counts from the last model exported
    /// (or the only model).
    fn finish_report(&mut self) -> Result<(), RunError> {
        // Every model's parameters; final counts of the exported (or first) model.
        for (model, state) in &self.models {
            for p in state.model.params() {
                let zeros = rt::eval::count_zeros(p.var.as_tensor())
                    .map_err(|e| RunError::Internal(e.to_string()))?;
                self.report.layers.push(Layer {
                    model: model.clone(),
                    name: p.name.clone(),
                    shape: p.shape(),
                    total: p.numel(),
                    kept: p.numel() - zeros,
                });
            }
        }
        // Language models: every block linear (what their prunes target).
        for lm in self.llms.keys().cloned().collect::<Vec<_>>() {
            for (name, shape, total, zeros) in self.llm_linear_zeros(&lm)? {
                self.report.layers.push(Layer {
                    model: lm.clone(),
                    name,
                    shape,
                    total,
                    kept: total - zeros,
                });
            }
        }
        let name = self
            .report
            .exported
            .clone()
            .or_else(|| self.models.keys().next().cloned());
        let Some(name) = name else {
            if let Some(lm) = self.llms.keys().next().cloned() {
                self.report.final_sparsity = self.llm_sparsity(&lm, Span::default())?;
            }
            return Ok(());
        };
        let counts = rt::eval::model_counts(&self.models[&name].model)
            .map_err(|e| RunError::Internal(e.to_string()))?;
        let (sparsity, _) = self.sparsity_pqi(&name, Span::default())?;
        self.report.final_sparsity = sparsity;
        self.report.counts = Some(counts);
        Ok(())
    }
}
