//! Stages on language models (`model lm = gguf(...)`): perplexity on text,
//! one-shot pruning through the runtime's sequential driver — the criterion
//! compiled to a scoring kernel, or SparseGPT — and Hugging Face export.

use super::{rt_err_llm, Exec, RunError};
use crate::lower;
use crate::plan::{Action, Analysis, AnalysisKind, DataRef, Prune, Step};
use crate::specs::text_files;
use prunec_kernels::{PruneOptions, Selection, TensorView};

use prunec_lang::check::Value;
use prunec_lang::resolved::{Method, Metric, Pattern, Scope, Unit};
use prunec_lang::Span;
use prunec_runtime::llm;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Tokens evaluated when a `text` data set gives no `samples`.
pub const DEFAULT_EVAL_TOKENS: usize = 16_384;
/// Calibration sequences when a `text` data set gives no `samples`.
pub const DEFAULT_CALIBRATION: usize = 32;

/// The options of a `text(...)` data set, with the builtin table's defaults.
struct TextSpec {
    seq: usize,
    samples: usize,
    offset: usize,
    batch: usize,
    /// The language model whose tokenizer cuts the text.
    tokenizer: String,
    /// The string field of `.jsonl` records.
    field: String,
}

impl TextSpec {
    fn of(v: &Value) -> TextSpec {
        let int = |k: &str, d: i64| v.arg(k).and_then(|x| x.as_i64()).unwrap_or(d).max(0) as usize;
        TextSpec {
            seq: int("seq", 256).max(2),
            samples: int("samples", 0),
            offset: int("offset", 0),
            batch: int("batch", 1).max(1),
            tokenizer: v
                .arg("tokenizer")
                .and_then(|t| t.as_str())
                .unwrap_or_default()
                .to_string(),
            field: v
                .arg("field")
                .and_then(|t| t.as_str())
                .unwrap_or("text")
                .to_string(),
        }
    }

    /// The text of each file (a `.jsonl` file's records joined), at `span` on failure.
    fn documents(&self, files: &[PathBuf], span: Span) -> Result<Vec<String>, RunError> {
        files
            .iter()
            .map(|f| {
                prunec_runtime::data::text::read_document(f, &self.field)
                    .map_err(|e| RunError::user(span, e.to_string()))
            })
            .collect()
    }
}

/// A block linear's name, shape, size and count of zeros.
pub(super) type LinearZeros = (String, Vec<usize>, usize, usize);

impl Exec<'_> {
    /// Whether `name` is a language model.
    pub(super) fn is_llm(&self, name: &str) -> bool {
        self.declared(name)
            .and_then(|v| v.call_name())
            .is_some_and(prunec_lang::check::models::is_language_model_constructor)
    }

    fn llm(&mut self, name: &str, span: Span) -> Result<&mut llm::LlamaModel, RunError> {
        if !self.llms.contains_key(name) {
            let v = self
                .declared(name)
                .cloned()
                .unwrap_or(Value::Ref(name.into()));
            let path = PathBuf::from(v.arg("path").and_then(|p| p.as_str()).unwrap_or(""));
            let model = if v.call_name() == Some("hf") {
                let header = llm::inspect_hf(&path)
                    .map_err(rt_err_llm(span, "cannot load the language model"))?;
                // Every file the model is read from is an input of the run.
                let mut read = vec![path.join("config.json")];
                if header.shards.is_some() {
                    read.push(path.join(llm::hf::INDEX_FILE));
                }
                read.extend(header.files.iter().cloned());
                read.extend(
                    llm::hf::CARRIED_FILES
                        .iter()
                        .map(|f| path.join(f))
                        .filter(|f| f.is_file()),
                );
                for f in &read {
                    self.hash_input(f, span)?;
                }
                llm::load_hf_inspected(&path, header)
                    .map_err(rt_err_llm(span, "cannot load the language model"))?
            } else {
                if !path.is_file() {
                    return Err(RunError::User {
                        span: Some(span),
                        message: format!("missing model file {}", path.display()),
                        help: Some("run `scripts/fetch-data.sh smollm2`".into()),
                    });
                }
                self.hash_input(&path, span)?;
                llm::load_gguf(&path).map_err(rt_err_llm(span, "cannot load the language model"))?
            };
            self.llms.insert(name.to_string(), model);
        }
        Ok(self.llms.get_mut(name).unwrap())
    }

    /// The `text(...)` declaration behind a data set expression, with its files.
    fn text_data(&mut self, e: &DataRef) -> Result<(Value, Vec<PathBuf>), RunError> {
        let name = e.name.clone();
        let v = self
            .declared(&name)
            .cloned()
            .ok_or_else(|| RunError::user(e.span, format!("`{name}` is not a data set")))?;
        if v.call_name() != Some("text") {
            return Err(RunError::user(
                e.span,
                format!("language models read `text(...)` data; `{name}` is not one"),
            ));
        }
        let path = PathBuf::from(v.arg("path").and_then(|p| p.as_str()).unwrap_or(""));
        let files = text_files(&path).map_err(|err| RunError::User {
            span: Some(e.span),
            message: format!("cannot read the text {}: {err}", path.display()),
            help: Some("run `scripts/fetch-data.sh text`".into()),
        })?;
        if files.is_empty() {
            return Err(RunError::user(
                e.span,
                format!("{} holds no .txt file", path.display()),
            ));
        }
        for f in &files {
            self.hash_input(f, e.span)?;
        }
        Ok((v, files))
    }

    /// The tokenizer of the language model a `text(tokenizer = M)` names.
    fn tokenizer(&mut self, spec: &TextSpec, span: Span) -> Result<llm::TextTokenizer, RunError> {
        let m = self.llm(&spec.tokenizer, span)?;
        m.tokenizer.clone().ok_or_else(|| {
            RunError::user(
                span,
                format!(
                    "the model file of `{}` carries no tokenizer",
                    spec.tokenizer
                ),
            )
        })
    }

    /// The fraction of zero weights over the blocks' linear layers.
    pub(super) fn llm_sparsity(&self, model: &str, span: Span) -> Result<f64, RunError> {
        let layers = self.llm_linear_zeros_at(model, span)?;
        let total: usize = layers.iter().map(|l| l.2).sum();
        let zeros: usize = layers.iter().map(|l| l.3).sum();
        Ok(zeros as f64 / total.max(1) as f64)
    }

    /// Every block linear of a language model: name, shape, size and zeros.
    pub(super) fn llm_linear_zeros(&self, model: &str) -> Result<Vec<LinearZeros>, RunError> {
        self.llm_linear_zeros_at(model, Span::default())
    }

    fn llm_linear_zeros_at(&self, model: &str, span: Span) -> Result<Vec<LinearZeros>, RunError> {
        let m = &self.llms[model];
        let mut out = Vec::new();
        for (name, t) in m.named_tensors().map_err(rt_err_llm(span, "sparsity"))? {
            if !name.starts_with("model.layers.") || !name.ends_with("proj.weight") {
                continue;
            }
            let shape = t.dims().to_vec();
            let v: Vec<f32> = t
                .flatten_all()
                .and_then(|t| t.to_dtype(candle_core::DType::F32))
                .and_then(|t| t.to_vec1())
                .map_err(|e| RunError::Internal(e.to_string()))?;
            let zeros = v.iter().filter(|x| **x == 0.0).count();
            out.push((name, shape, v.len(), zeros));
        }
        Ok(out)
    }

    /// Non-zero parameters of every tensor of the model.
    fn llm_kept_params(&self, model: &str, span: Span) -> Result<usize, RunError> {
        let mut kept = 0;
        for (_, t) in self.llms[model]
            .named_tensors()
            .map_err(rt_err_llm(span, "counting parameters"))?
        {
            let v: Vec<f32> = t
                .flatten_all()
                .and_then(|t| t.to_dtype(candle_core::DType::F32))
                .and_then(|t| t.to_vec1())
                .map_err(|e| RunError::Internal(e.to_string()))?;
            kept += v.iter().filter(|x| **x != 0.0).count();
        }
        Ok(kept)
    }

    pub(super) fn llm_stage(
        &mut self,
        step: &Step,
        model: &str,
        span: Span,
    ) -> Result<(), RunError> {
        self.llm(model, span)?;
        match &step.action {
            Action::Evaluate {
                metrics, label, kv, ..
            } => self.llm_evaluate(step, model, metrics, label.as_deref(), kv.as_ref()),
            Action::Prune(p) => self.llm_prune(step, p, model),
            Action::Analyze(a) => self.llm_search(step, model, a),
            Action::Export { .. } => self.llm_export(step, model),
            _ => Err(RunError::user(
                step.site.keyword,
                format!(
                    "`{}` stages on language models are not supported yet",
                    step.site.kind
                ),
            )),
        }
    }

    fn llm_evaluate(
        &mut self,
        step: &Step,
        model: &str,
        wanted: &[Metric],
        label: Option<&str>,
        kv: Option<&crate::ir::KvCache>,
    ) -> Result<(), RunError> {
        let on = Self::on_data(step)?;
        let (v, files) = self.text_data(on)?;
        let spec = TextSpec::of(&v);
        let (seq, batch) = (spec.seq, spec.batch);
        let max_tokens = if spec.samples > 0 {
            spec.samples * seq
        } else {
            DEFAULT_EVAL_TOKENS
        };
        let text = spec.documents(&files, on.span)?.concat();
        let tok = self.tokenizer(&spec, on.span)?;
        // `offset` skips the text's first tokens (a split disjoint from calibration).
        let mut tokens = llm::leading_tokens(&tok, &text, max_tokens + spec.offset)
            .map_err(rt_err_llm(step.span, "tokenizing"))?;
        if tokens.len() <= spec.offset {
            return Err(RunError::user(
                on.span,
                format!(
                    "the text has {} tokens, none after `offset = {}`",
                    tokens.len(),
                    spec.offset
                ),
            ));
        }
        tokens.drain(..spec.offset);
        // One timing serves `latency` and `throughput` alike.
        let timed = match wanted.iter().any(|m| m.is_timing()) {
            true => Some(
                llm::eval::forward_latency(
                    &self.llms[model],
                    &tokens,
                    seq,
                    batch,
                    super::LATENCY_WARMUP,
                    super::LATENCY_RUNS,
                )
                .map_err(rt_err_llm(step.span, "timing the forward pass"))?,
            ),
            false => None,
        };
        let mut out = BTreeMap::new();
        let mut cache = None;
        for &m in wanted {
            let value = match m {
                Metric::Perplexity => match kv {
                    None => llm::perplexity(&self.llms[model], &tokens, seq, batch),
                    Some(kv) => {
                        let budget = kv_budget(kv, seq)?;
                        cache = Some(crate::report::KvCacheUsed {
                            policy: kv.policy.clone(),
                            budget: kv.budget,
                            keys: budget.keys,
                            window: seq,
                        });
                        if self.progress {
                            eprintln!(
                                "  decoding with a bounded cache: {} of {seq} keys per query, {} policy",
                                budget.keys, kv.policy
                            );
                        }
                        llm::perplexity_kv(&self.llms[model], &tokens, seq, batch, budget)
                    }
                }
                .map_err(rt_err_llm(step.span, "perplexity"))?,
                Metric::Sparsity => self.llm_sparsity(model, step.span)?,
                Metric::Params => self.llm_kept_params(model, step.span)? as f64,
                Metric::Latency | Metric::Throughput => match (m, timed) {
                    (Metric::Latency, Some((secs, _))) => secs * 1e3,
                    (_, Some((secs, b))) => (b * seq) as f64 / secs.max(1e-12),
                    (_, None) => return Err(RunError::Internal("no timing".into())),
                },
                other => {
                    return Err(RunError::user(
                        step.site.out.unwrap_or(step.span),
                        format!("`{other}` cannot be measured on a language model"),
                    ))
                }
            };
            out.insert(m.as_str().to_string(), value);
        }
        let data = on.name.clone();
        self.record_evaluation(step.span, label, model, &data, out);
        if let Some(last) = self.report.evaluations.last_mut() {
            last.kv_cache = cache;
        }
        Ok(())
    }

    /// A text data set's calibration windows (seeded draws, `samples` of
    /// them, else the default count) and its batch, the chunk of sequences
    /// per forward.
    fn llm_calibration(
        &mut self,
        step: &Step,
        d: &DataRef,
    ) -> Result<(Vec<Vec<u32>>, usize), RunError> {
        let (v, files) = self.text_data(d)?;
        let spec = TextSpec::of(&v);
        let count = if spec.samples > 0 {
            spec.samples
        } else {
            DEFAULT_CALIBRATION
        };
        let tok = self.tokenizer(&spec, step.span)?;
        let documents = spec.documents(&files, d.span)?;
        let windows = llm::calibration_windows_in(
            &tok,
            &documents,
            count,
            spec.seq,
            spec.offset,
            self.r.seed,
        )
        .map_err(rt_err_llm(step.span, "calibration text"))?;
        if self.save_calibration {
            self.write_calibration(&d.name, &windows, step.span)?;
            self.saved_calibrations.insert(d.name.clone());
        }
        Ok((windows, spec.batch))
    }

    /// `prunec run --save-calibration`: the windows as `input_ids` (i64,
    /// `[samples, seq]`, the dtype Hugging Face models take) in
    /// `calibration/<data set>.safetensors` of the run's outputs.
    fn write_calibration(
        &self,
        data: &str,
        windows: &[Vec<u32>],
        span: Span,
    ) -> Result<(), RunError> {
        let seq = windows.first().map_or(0, Vec::len);
        let ids: Vec<i64> = windows.iter().flatten().map(|&t| i64::from(t)).collect();
        let t = candle_core::Tensor::from_vec(ids, (windows.len(), seq), &candle_core::Device::Cpu)
            .map_err(|e| RunError::Internal(e.to_string()))?;
        let dir = self.staging.join("calibration");
        let path = dir.join(format!("{data}.safetensors"));
        let meta = BTreeMap::from([
            ("dataset".to_string(), data.to_string()),
            ("seed".to_string(), self.r.seed.to_string()),
        ]);
        std::fs::create_dir_all(&dir)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                prunec_runtime::save_safetensors_atomic(
                    &path,
                    &[("input_ids".into(), t)],
                    &meta,
                    &[],
                )
                .map(|_| ())
                .map_err(|e| e.to_string())
            })
            .map_err(|e| RunError::User {
                span: Some(span),
                message: format!(
                    "cannot write the calibration windows {}: {e}",
                    path.display()
                ),
                help: None,
            })
    }

    /// `analyze lm on D by search(...)`: NSGA-II over the blocks'
    /// sparsities; the front goes to the report and, by the stage's label,
    /// to later `allocation = pareto(LABEL)` stages.
    fn llm_search(&mut self, step: &Step, model: &str, a: &Analysis) -> Result<(), RunError> {
        let AnalysisKind::Search {
            criterion,
            population,
            generations,
            range,
        } = &a.kind
        else {
            return Err(RunError::user(
                step.site.keyword,
                format!("`{}` studies classifiers, not language models", a.name),
            ));
        };
        let by = step.site.by.unwrap_or(step.site.keyword);
        let score = llm::search::SearchScore::named(criterion).ok_or_else(|| {
            RunError::Internal(format!("`{criterion}` reached a search as its criterion"))
        })?;
        let on = Self::on_data(step)?.clone();
        let (windows, batch) = self.llm_calibration(step, &on)?;
        let seed = self.r.seed ^ (u64::from(step.stage.0) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let dense = &self.llms[model];
        let problem = llm::search::SearchProblem::new(dense, &windows, score, batch)
            .map_err(rt_err_llm(by, "ranking the weights for the search"))?;
        let dense_perplexity = problem
            .perplexity(dense)
            .map_err(rt_err_llm(by, "the dense perplexity"))?;
        let (progress, interrupted) = (self.progress, self.interrupted.clone());
        let total = population * (generations + 1);
        let outcome = problem.search(dense, *population, *generations, *range, seed, |n, g, o| {
            if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(llm::RuntimeError::Invalid("interrupted".into()));
            }
            if progress {
                let lo = g.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = g.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                eprintln!(
                    "search {model}: candidate {n} (of at most {total}): sparsity {:.2}% (blocks {:.1}% .. {:.1}%), perplexity {:.3}",
                    (1.0 - o[1]) * 100.0,
                    lo * 100.0,
                    hi * 100.0,
                    o[0]
                );
            }
            Ok(())
        });
        if self.interrupted.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(RunError::Interrupted);
        }
        let outcome = outcome.map_err(rt_err_llm(by, "the search"))?;
        let point = |p: &prunec_runtime::search::Point| crate::report::SearchPoint {
            blocks: p.genes.clone(),
            sparsity: 1.0 - p.objectives[1],
            perplexity: p.objectives[0],
        };
        // Allocations whose per-row counts round alike score alike: one
        // point per pair of objectives, the first evaluated.
        let mut front: Vec<prunec_runtime::search::Point> = Vec::new();
        for p in &outcome.front {
            if !front.iter().any(|q| q.objectives == p.objectives) {
                front.push(p.clone());
            }
        }
        let knee = prunec_runtime::search::knee(&front).unwrap_or(0);
        let study = crate::report::SearchStudy {
            step: step.id.clone(),
            span: step.span,
            model: model.to_string(),
            label: a.label.clone(),
            data: a.data.clone(),
            criterion: criterion.clone(),
            population: *population,
            generations: *generations,
            range: *range,
            dense_perplexity,
            block_weights: problem.block_weights(),
            front: front.iter().map(point).collect(),
            knee,
            candidates: outcome.all.iter().map(point).collect(),
            plot: a.path.clone(),
        };
        let k = &study.front[knee];
        if self.progress {
            eprintln!(
                "search {model}: {} candidates, a front of {}; knee at sparsity {:.2}%, perplexity {:.3}",
                study.candidates.len(),
                study.front.len(),
                k.sparsity * 100.0,
                k.perplexity
            );
        }
        self.study_results(
            a.label.as_ref(),
            &[
                ("points", study.front.len() as f64),
                ("knee_perplexity", k.perplexity),
                ("knee_sparsity", k.sparsity),
            ],
        );
        if let Some(l) = &a.label {
            self.fronts.insert(l.clone(), study.clone());
        }
        self.report.searches.push(study);
        Ok(())
    }

    /// `allocation = pareto(LABEL, pick)`: the blocks' sparsities and the
    /// target. `pick = target`: among the front's points at least as sparse
    /// as `to`, the lowest perplexity (else the sparsest point), shifted to
    /// average `to`; `knee`: the knee as it is.
    fn pareto_pick(
        &self,
        step: &Step,
        model: &str,
        alloc: &Value,
        target: Option<f64>,
    ) -> Result<(Vec<f64>, f64), RunError> {
        let label = alloc.arg("front").and_then(|v| v.as_str()).unwrap_or("?");
        let front = self.fronts.get(label).ok_or_else(|| {
            RunError::Internal(format!("the front `{label}` was not searched before"))
        })?;
        let blocks = self.llms[model].num_layers();
        if front.block_weights.len() != blocks {
            return Err(RunError::user(
                step.span,
                format!(
                    "the front `{label}` holds {} block sparsities; `{model}` has {blocks} blocks",
                    front.block_weights.len()
                ),
            ));
        }
        let knee = alloc.arg("pick").and_then(|v| v.as_str()) == Some("knee");
        let (i, blocks, target) = match (knee, target) {
            (true, _) | (false, None) => {
                let k = &front.front[front.knee];
                (front.knee, k.blocks.clone(), k.sparsity)
            }
            (false, Some(t)) => {
                let meets = front
                    .front
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.sparsity >= t - 1e-9)
                    .min_by(|a, b| {
                        a.1.perplexity
                            .total_cmp(&b.1.perplexity)
                            .then(a.0.cmp(&b.0))
                    });
                let i = match meets {
                    Some((i, _)) => i,
                    None => front
                        .front
                        .iter()
                        .enumerate()
                        .max_by(|a, b| a.1.sparsity.total_cmp(&b.1.sparsity).then(b.0.cmp(&a.0)))
                        .map(|(i, _)| i)
                        .unwrap_or(0),
                };
                let shifted =
                    llm::search::shift_to_mean(&front.front[i].blocks, &front.block_weights, t);
                (i, shifted, t)
            }
        };
        if self.progress {
            let p = &front.front[i];
            eprintln!(
                "pareto {label}: point {i} of {} (sparsity {:.2}%, search perplexity {:.3}){}",
                front.front.len(),
                p.sparsity * 100.0,
                p.perplexity,
                if knee {
                    " (the knee)".to_string()
                } else {
                    format!(", every block moved to average {:.2}%", target * 100.0)
                }
            );
        }
        Ok((blocks, target))
    }

    fn llm_prune(&mut self, step: &Step, p: &Prune, model: &str) -> Result<(), RunError> {
        let by = &p.by.expr;
        let picked = match self
            .option(step, "allocation")
            .filter(|a| a.call_name() == Some("pareto"))
        {
            Some(a) => Some(self.pareto_pick(step, model, &a, p.target)?),
            None => None,
        };
        let pattern = match p.pattern {
            Some(Pattern::NM { n, m }) => llm::SparsityPattern::NofM {
                n: n as usize,
                m: m as usize,
            },
            Some(Pattern::Block { .. }) => {
                return Err(RunError::Internal(
                    "a block pattern reached a language model's prune step".into(),
                ))
            }
            None => {
                let target = p.target.or(picked.as_ref().map(|x| x.1)).ok_or_else(|| {
                    RunError::user(
                        step.site.to.unwrap_or(step.site.keyword),
                        "give a constant target (`to 50%`) or a `pattern`",
                    )
                })?;
                llm::SparsityPattern::Unstructured(target)
            }
        };
        let mut config = llm::OneShotConfig::new(pattern);
        config.sequential = !matches!(self.option(step, "sequential"), Some(Value::Bool(false)));
        config.true_sequential = matches!(
            self.option(step, "true_sequential"),
            Some(Value::Bool(true))
        );
        if let Some(t) = self.option(step, "targets") {
            config.targets = lower::strings(Some(&t));
        }
        config
            .skip
            .extend(lower::strings(self.option(step, "skip").as_ref()));
        // Calibration text: `calibrate = D`, else `on D`.
        let windows = match &p.stats_data {
            Some(d) => {
                let (windows, batch) = self.llm_calibration(step, d)?;
                config.batch = batch;
                windows
            }
            None => Vec::new(),
        };
        if let Some(unit) = p.unit.filter(|u| u.of_experts()) {
            return self.llm_prune_experts(step, p, model, unit, &windows, config.batch);
        }
        if let Some(unit) = p.unit {
            return self.llm_prune_units(step, p, model, unit, &windows, config.batch);
        }
        if let Some((blocks, _)) = picked {
            config.block_sparsity = Some(blocks);
        } else if let Some(alloc) = self.option(step, "allocation") {
            config.block_sparsity =
                Some(self.owl_allocation(step, model, &alloc, &config, &windows)?);
        }
        let report = match p.method {
            Method::SparseGpt => {
                // The plan resolved the arguments, defaults included.
                let get = |k: &str| {
                    p.args.get(k).copied().ok_or_else(|| {
                        RunError::Internal(format!(
                            "step {}: SparseGPT has no argument `{k}`",
                            step.id
                        ))
                    })
                };
                let mut pruner = llm::SparseGptPruner {
                    config: llm::SparseGptConfig {
                        block_size: get("block")?.max(1.0) as usize,
                        damp: get("damp")?,
                        precision: match Method::word_argument(self.r, by, "precision").as_deref() {
                            Some("f32") => llm::SolverPrecision::F32,
                            Some("f64") => llm::SolverPrecision::F64,
                            other => {
                                return Err(RunError::Internal(format!(
                                    "step {}: SparseGPT precision {other:?}",
                                    step.id
                                )))
                            }
                        },
                    },
                };
                let mut shown = self.layer_progress(model, &config, &mut pruner);
                let m = self.llms.get_mut(model).unwrap();
                let r = llm::prune_one_shot(m, &windows, &config, &mut shown);
                shown.finish();
                r.map_err(rt_err_llm(step.span, "SparseGPT"))?
            }
            Method::Armor => {
                let get = |k: &str| {
                    p.args.get(k).copied().ok_or_else(|| {
                        RunError::Internal(format!("step {}: ARMOR has no argument `{k}`", step.id))
                    })
                };
                let init = Method::word_argument(self.r, by, "init");
                let init = match init.as_deref() {
                    Some("wanda") => llm::armor::ArmorInit::Wanda,
                    Some("sparsegpt") => {
                        llm::armor::ArmorInit::SparseGpt(llm::SparseGptConfig::default())
                    }
                    other => {
                        return Err(RunError::Internal(format!(
                            "ARMOR's `init = {other:?}` reached the run"
                        )))
                    }
                };
                let mut pruner = llm::armor::ArmorPruner::new(
                    init,
                    llm::armor::ArmorConfig {
                        block: get("block")?.max(1.0) as usize,
                        iters: get("iters")?.max(0.0) as usize,
                        s_steps: 2,
                    },
                );
                let mut shown = self.layer_progress(model, &config, &mut pruner);
                let m = self.llms.get_mut(model).unwrap();
                let r = llm::prune_one_shot(m, &windows, &config, &mut shown);
                shown.finish();
                let r = r.map_err(rt_err_llm(step.span, "ARMOR"))?;
                let (before, after) = pruner
                    .losses
                    .iter()
                    .fold((0.0, 0.0), |(b, a), l| (b + l.1, a + l.2));
                if self.progress {
                    eprintln!(
                        "armor {model}: proxy loss over {} layers {before:.4e} -> {after:.4e} ({:.1}% lower)",
                        pruner.losses.len(),
                        100.0 * (1.0 - after / before.max(f64::MIN_POSITIVE))
                    );
                }
                self.report.armor.push(crate::report::ArmorStage {
                    step: step.id.clone(),
                    model: model.to_string(),
                    layers: pruner.losses.clone(),
                });
                r
            }
            _ => {
                let lowered = match &p.kernel {
                    Some(k) => k.clone(),
                    None => lower::criterion_to_kernel(self.r, by)?,
                };
                if !lowered.row_sums.is_empty() {
                    return Err(RunError::user(
                        by.span,
                        "group sums are not supported on language models yet",
                    ));
                }
                let expr = lowered.expr;
                let reads_acts = !expr.col_stats().is_empty();
                if expr.needs_grad() || expr.needs_init() {
                    return Err(RunError::user(
                        by.span,
                        "one-shot pruning of language models reads weights and activations only",
                    ));
                }
                if reads_acts && windows.is_empty() {
                    return Err(RunError::user(
                        by.span,
                        "this criterion reads activations: add `calibrate = DATASET`",
                    ));
                }
                // `prunec check` admits `row`/`neuron` and `layer` on language
                // models, and an unwritten scope only for criteria reading
                // `act(x)`, whose default is `row` everywhere.
                if let (Scope::Global, llm::SparsityPattern::Unstructured(target)) =
                    (p.scope, config.pattern)
                {
                    if reads_acts {
                        return Err(RunError::Internal(
                            "`scope = global` with activations reached a language model".into(),
                        ));
                    }
                    return self.llm_prune_global(step, model, &config, &expr, target);
                }
                let scope = p.scope;
                let mut pruner = KernelPruner {
                    method: self.src_text(by.span),
                    expr,
                    reads_acts,
                    scope,
                };
                let mut shown = self.layer_progress(model, &config, &mut pruner);
                let m = self.llms.get_mut(model).unwrap();
                let r = llm::prune_one_shot(m, &windows, &config, &mut shown);
                shown.finish();
                r.map_err(rt_err_llm(step.span, "pruning"))?
            }
        };
        if self.progress {
            eprintln!(
                "prune {model}: {} layers in {:.1} s (calibration {:.1} s, {} tokens)",
                report.layers.len(),
                report.total_seconds,
                report.calibration_seconds,
                report.calibration_tokens
            );
        }
        Ok(())
    }

    /// OWL's per-block sparsities for an unstructured target, from one dense
    /// calibration pass.
    fn owl_allocation(
        &mut self,
        step: &Step,
        model: &str,
        alloc: &Value,
        config: &llm::OneShotConfig,
        windows: &[Vec<u32>],
    ) -> Result<Vec<f64>, RunError> {
        let span = step.span;
        let llm::SparsityPattern::Unstructured(target) = config.pattern else {
            return Err(RunError::user(
                span,
                "OWL spreads an unstructured target, not an N:M pattern",
            ));
        };
        let arg = |k: &str| {
            alloc
                .arg(k)
                .and_then(|v| v.as_f64())
                .or_else(|| prunec_lang::builtins::default_number("owl", Some(k)))
                .ok_or_else(|| RunError::Internal(format!("owl without `{k}`")))
        };
        let (m, lambda) = (arg("m")?, arg("lambda")?);
        let ratios = llm::owl::outlier_ratios(&self.llms[model], windows, config, m)
            .map_err(rt_err_llm(span, "OWL's outlier ratios"))?;
        let sparsities = llm::owl::owl_allocation(&ratios, target, lambda);
        if self.progress {
            let shown: Vec<String> = ratios
                .iter()
                .zip(&sparsities)
                .enumerate()
                .filter_map(|(l, (r, s))| {
                    r.map(|r| format!("{l}: {:.2}% → {:.1}%", r * 100.0, s * 100.0))
                })
                .collect();
            eprintln!(
                "OWL outlier ratios and block sparsities: {}",
                shown.join(", ")
            );
        }
        Ok(sparsities)
    }

    /// `unit = expert | expert_neuron` on a mixture-of-experts model: the
    /// experts' statistics on the calibration windows (with the loss
    /// gradients for HEAPr), then per sparse block the same number of
    /// experts kept (the highest scores; ties keep the lower expert), or the
    /// lowest-scored atomic experts removed across the block's experts (each
    /// expert keeping one at least).
    fn llm_prune_experts(
        &mut self,
        step: &Step,
        p: &Prune,
        model: &str,
        unit: Unit,
        windows: &[Vec<u32>],
        batch: usize,
    ) -> Result<(), RunError> {
        let by = &p.by.expr;
        if windows.is_empty() {
            return Err(RunError::user(
                by.span,
                "expert scores read the calibration tokens: add `calibrate = DATASET`",
            ));
        }
        let target = p.target.ok_or_else(|| {
            RunError::user(
                step.site.to.unwrap_or(step.site.keyword),
                "removing experts needs a constant target fraction (`to 25%`)",
            )
        })?;
        let t0 = std::time::Instant::now();
        let m = &self.llms[model];
        let Some(mc) = m.config.moe.clone() else {
            return Err(RunError::Internal(format!(
                "`unit = {unit}` reached `{model}`, which has no experts"
            )));
        };
        let heapr = p.method == Method::Heapr;
        let stats = llm::moe_statistics(m, windows, batch, heapr)
            .map_err(rt_err_llm(step.span, "scoring experts"))?;
        // Per sparse block: a score per expert, or per atomic expert.
        let atomic = |s: &llm::MoeLayerStats| -> Vec<Vec<f64>> {
            match p.method {
                Method::Heapr => s.heapr.clone(),
                _ => s.reap_atomic.clone(),
            }
        };
        let whole = |s: &llm::MoeLayerStats| -> Vec<f64> {
            match p.method {
                Method::Heapr => s.heapr_expert.clone(),
                Method::Reap => s.reap.clone(),
                _ => s.frequency.clone(),
            }
        };
        let params = |m: &llm::LlamaModel| llm_params(m, step.span);
        let before = params(m)?;
        let sparse = stats.iter().filter(|s| s.is_some()).count();
        let mut layers = Vec::new();
        let check_finite = |l: usize, v: &[f64]| -> Result<(), RunError> {
            match v.iter().position(|x| !x.is_finite()) {
                Some(i) => Err(RunError::user(
                    step.span,
                    format!("block {l}: a score is {} (unit {i}): the weights or activations are not finite", v[i]),
                )),
                None => Ok(()),
            }
        };
        if unit == Unit::Expert {
            let kept = crate::units::kept_per_layer(mc.num_experts, target);
            if kept < mc.top_k {
                return Err(RunError::user(
                    step.site.to.unwrap_or(step.span),
                    format!(
                        "{kept} of {} experts would stay, fewer than the {} each token uses",
                        mc.num_experts, mc.top_k
                    ),
                ));
            }
            let mut keep = Vec::with_capacity(stats.len());
            for (l, s) in stats.iter().enumerate() {
                let Some(s) = s else {
                    keep.push(None);
                    continue;
                };
                let scores = whole(s);
                check_finite(l, &scores)?;
                let mut order: Vec<usize> = (0..scores.len()).collect();
                order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
                let mut k = order[..kept].to_vec();
                k.sort_unstable();
                keep.push(Some(k));
            }
            layers.push((
                format!("every sparse block ({sparse})"),
                mc.num_experts,
                kept,
            ));
            llm::remove_experts(self.llms.get_mut(model).unwrap(), &keep)
                .map_err(rt_err_llm(step.span, "removing experts"))?;
        } else {
            let equal = matches!(self.option(step, "equal_widths"), Some(Value::Bool(true)));
            let global = p.scope == Scope::Global;
            // Every atomic expert: (block, expert, index, score).
            let mut all: Vec<(usize, usize, usize, f64)> = Vec::new();
            for (l, s) in stats.iter().enumerate() {
                let Some(s) = s else { continue };
                let scores = atomic(s);
                for (e, v) in scores.iter().enumerate() {
                    check_finite(l, v)?;
                    all.extend(v.iter().enumerate().map(|(i, &x)| (l, e, i, x)));
                }
            }
            // The groups ranked together: each expert (`equal_widths`),
            // every sparse block (`scope = global`), or each block.
            let group_of = |&(l, e, _, _): &(usize, usize, usize, f64)| -> (usize, usize) {
                match (equal, global) {
                    (true, _) => (l, e),
                    (false, true) => (0, 0),
                    (false, false) => (l, 0),
                }
            };
            let mut groups: std::collections::BTreeMap<(usize, usize), Vec<usize>> =
                Default::default();
            for (j, a) in all.iter().enumerate() {
                groups.entry(group_of(a)).or_default().push(j);
            }
            let mut left: std::collections::BTreeMap<(usize, usize), usize> = Default::default();
            for a in &all {
                *left.entry((a.0, a.1)).or_default() += 1;
            }
            let mut gone = vec![false; all.len()];
            for (g, members) in &groups {
                let asked = (members.len() as f64 * target + 1e-9).floor() as usize;
                let mut order = members.clone();
                order.sort_by(|&a, &b| all[a].3.total_cmp(&all[b].3).then(a.cmp(&b)));
                let mut removed = 0;
                for &j in &order {
                    if removed == asked {
                        break;
                    }
                    let n = left.get_mut(&(all[j].0, all[j].1)).expect("counted");
                    if *n > 1 {
                        *n -= 1;
                        gone[j] = true;
                        removed += 1;
                    }
                }
                if removed < asked {
                    let which = match (equal, global) {
                        (true, _) => format!("expert {} of block {}", g.1, g.0),
                        (false, true) => "the sparse blocks".to_string(),
                        (false, false) => format!("block {}", g.0),
                    };
                    return Err(RunError::user(
                        step.site.to.unwrap_or(step.span),
                        format!("{which} can lose only {removed} of its {} atomic experts (every expert keeps one), not {asked}", members.len()),
                    ));
                }
            }
            let mut keep: Vec<Option<Vec<Vec<usize>>>> = stats
                .iter()
                .map(|s| s.as_ref().map(|s| vec![Vec::new(); s.frequency.len()]))
                .collect();
            for (j, &(l, e, i, _)) in all.iter().enumerate() {
                if !gone[j] {
                    keep[l].as_mut().expect("a sparse block")[e].push(i);
                }
            }
            for (l, k) in keep.iter().enumerate() {
                let Some(k) = k else { continue };
                let total = all.iter().filter(|a| a.0 == l).count();
                let kept_here: usize = k.iter().map(Vec::len).sum();
                layers.push((format!("block {l} (atomic experts)"), total, kept_here));
            }
            llm::remove_atomic_experts(self.llms.get_mut(model).unwrap(), &keep)
                .map_err(rt_err_llm(step.span, "removing atomic experts"))?;
        }
        let after = params(&self.llms[model])?;
        if self.progress {
            let shown: Vec<String> = layers
                .iter()
                .map(|(w, n, k)| format!("{w}: {k} of {n}"))
                .collect();
            eprintln!(
                "prune {model}: {unit} units by {} kept {} ({:.1} s)",
                p.method.name(),
                shown.join(", "),
                t0.elapsed().as_secs_f64()
            );
        }
        let (line, _) = prunec_lang::diag::line_col(&self.r.source, step.span.start);
        self.report.shrinks.push(crate::report::Shrink {
            model: model.to_string(),
            line,
            unit: unit.to_string(),
            layers,
            params_before: before,
            params_after: after,
        });
        Ok(())
    }

    /// `unit = ffn | kv_group`: every block's units scored on the dense
    /// model (the criterion over the weights that read them, with their
    /// input activations), the same number kept in every block, and the
    /// model cut to them.
    fn llm_prune_units(
        &mut self,
        step: &Step,
        p: &Prune,
        model: &str,
        unit: Unit,
        windows: &[Vec<u32>],
        batch: usize,
    ) -> Result<(), RunError> {
        let by = &p.by.expr;
        let lowered = match &p.kernel {
            Some(k) => k.clone(),
            None => lower::criterion_to_kernel(self.r, by)?,
        };
        if !lowered.row_sums.is_empty() || lowered.needs_grad() || lowered.needs_init() {
            return Err(RunError::user(
                by.span,
                "language-model units are scored from weights and activations only, without group sums",
            ));
        }
        let reads_acts = lowered.reads_acts();
        if reads_acts && windows.is_empty() {
            return Err(RunError::user(
                by.span,
                "this criterion reads activations: add `calibrate = DATASET`",
            ));
        }
        let target = p.target.ok_or_else(|| {
            RunError::user(
                step.site.to.unwrap_or(step.site.keyword),
                "removing units needs a constant target fraction (`to 20%`)",
            )
        })?;
        let lunit = match unit {
            Unit::Ffn => llm::LlmUnit::Ffn,
            Unit::KvGroup => llm::LlmUnit::KvGroup,
            Unit::Head => llm::LlmUnit::Head,
            other => {
                return Err(RunError::Internal(format!(
                    "`unit = {other}` reached a language model"
                )))
            }
        };
        let expr = lowered.expr;
        let opts = PruneOptions {
            scalars: vec![0.0],
            allow_nonfinite: false,
            single_pass: false,
        };
        let mut score = |name: &str,
                         w: &[f32],
                         rows: usize,
                         cols: usize,
                         norms: &[f32],
                         out: &mut [f32]|
         -> llm::Result<()> {
            let mut values = w.to_vec();
            let mut mask = prunec_kernels::full_mask(rows * cols);
            let mut view = TensorView::new(name, rows, cols, &mut values, &mut mask);
            if reads_acts {
                view.col_stats = vec![norms];
            }
            let s = prunec_kernels::score_jit(&expr, &view, &opts)
                .map_err(|e| llm::RuntimeError::Invalid(format!("{name}: {e}")))?;
            out.copy_from_slice(&s);
            Ok(())
        };
        let t0 = std::time::Instant::now();
        let m = &self.llms[model];
        let (scores, means) = llm::unit_scores(m, windows, lunit, reads_acts, batch, &mut score)
            .map_err(rt_err_llm(step.span, "scoring units"))?;
        let compensate = matches!(self.option(step, "compensate"), Some(Value::Bool(true)));
        let count = lunit.count(&m.config);
        // Query heads are chosen within each kv group, as many in each.
        let Some((per_group, kept_in_group, _)) = crate::units::llm_kept(&m.config, unit, target)
        else {
            return Err(RunError::Internal(format!(
                "`unit = {unit}` on a model it does not fit reached the run"
            )));
        };
        let kept = kept_in_group * (count / per_group);
        let key = prunec_kernels::expr::score_key;
        let mut keep = Vec::with_capacity(scores.len());
        for (l, s) in scores.iter().enumerate() {
            if let Some(u) = s.iter().position(|v| !v.is_finite()) {
                return Err(RunError::user(
                    step.span,
                    format!("unit {u} of block {l} scores {}: the weights or activations are not finite", s[u]),
                ));
            }
            // Highest first within each group; ties keep the earlier unit.
            let mut k = Vec::with_capacity(kept);
            for g in 0..s.len() / per_group {
                let mut idx: Vec<usize> = (g * per_group..(g + 1) * per_group).collect();
                idx.sort_by(|&a, &b| key(s[b]).cmp(&key(s[a])).then(a.cmp(&b)));
                k.extend_from_slice(&idx[..kept_in_group]);
            }
            k.sort_unstable();
            keep.push(k);
        }
        let params = |m: &llm::LlamaModel| llm_params(m, step.span);
        let before = params(&self.llms[model])?;
        let m = self.llms.get_mut(model).unwrap();
        if compensate {
            llm::compensate(m, lunit, &keep, &means)
                .map_err(rt_err_llm(step.span, "compensating the removed units"))?;
        }
        llm::remove_units(m, lunit, &keep).map_err(rt_err_llm(step.span, "removing units"))?;
        let after = params(&self.llms[model])?;
        if self.progress {
            eprintln!(
                "prune {model}: {unit} units kept {kept} of {count} in each of {} blocks ({:.1} s)",
                keep.len(),
                t0.elapsed().as_secs_f64()
            );
        }
        let (line, _) = prunec_lang::diag::line_col(&self.r.source, step.span.start);
        self.report.shrinks.push(crate::report::Shrink {
            model: model.to_string(),
            line,
            unit: unit.to_string(),
            layers: vec![(format!("every block ({})", keep.len()), count, kept)],
            params_before: before,
            params_after: after,
        });
        Ok(())
    }

    /// One global selection over every targeted linear layer, with the
    /// `keep_min` / `keep_max` guards: the classifiers' global kernel, for
    /// criteria that read the weights only (no calibration).
    fn llm_prune_global(
        &mut self,
        step: &Step,
        model: &str,
        config: &llm::OneShotConfig,
        expr: &prunec_kernels::KExpr,
        target: f64,
    ) -> Result<(), RunError> {
        let err = |e: llm::RuntimeError| RunError::user(step.span, format!("pruning: {e}"));
        let tensor_err = |e: candle_core::Error| RunError::Internal(format!("pruning: {e}"));
        let targeted = config.targeted(&self.llms[model]).map_err(err)?;
        let (keep_min, keep_max) = (self.option(step, "keep_min"), self.option(step, "keep_max"));
        let m = &self.llms[model];
        let mut layers = Vec::new();
        for (l, projs) in targeted.into_iter().enumerate() {
            for proj in projs {
                let name = llm::linear_name(l, proj);
                let w = m.linear_weight(l, proj).map_err(err)?;
                let (rows, cols) = w.dims2().map_err(tensor_err)?;
                let values = w
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(tensor_err)?;
                layers.push((l, proj, name, rows, cols, values));
            }
        }
        let sizes: Vec<usize> = layers.iter().map(|x| x.3 * x.4).collect();
        let total: usize = sizes.iter().sum();
        let guard = |v: &Option<Value>, default: fn(usize) -> usize| -> Vec<usize> {
            match v {
                Some(_) => sizes
                    .iter()
                    .map(|&n| super::prune::per_layer(v.as_ref(), n, default(n)).min(n))
                    .collect(),
                None => vec![],
            }
        };
        let selection = Selection::Global {
            keep: ((total as f64) * (1.0 - target)).round() as usize,
            min_keep: guard(&keep_min, |_| 0),
            max_keep: guard(&keep_max, |n| n),
        };
        let mut masks: Vec<Vec<u64>> = sizes
            .iter()
            .map(|&n| prunec_kernels::full_mask(n))
            .collect();
        let mut views: Vec<TensorView> = layers
            .iter_mut()
            .zip(masks.iter_mut())
            .map(|((_, _, name, rows, cols, w), mask)| TensorView::new(name, *rows, *cols, w, mask))
            .collect();
        let opts = PruneOptions {
            scalars: vec![0.0],
            allow_nonfinite: false,
            single_pass: false,
        };
        prunec_kernels::prune_jit(expr, &selection, &mut views, &opts)
            .map_err(|e| RunError::user(step.span, format!("pruning `{model}` failed: {e}")))?;
        drop(views);
        let m = self.llms.get_mut(model).unwrap();
        let device = m.device().clone();
        for (l, proj, _, rows, cols, w) in layers {
            let t = candle_core::Tensor::from_vec(w, (rows, cols), &device).map_err(tensor_err)?;
            m.set_linear_weight(l, proj, t).map_err(err)?;
        }
        if self.progress {
            eprintln!(
                "prune {model}: one global selection over {} layers",
                sizes.len()
            );
        }
        Ok(())
    }

    fn src_text(&self, span: Span) -> String {
        self.r
            .source
            .get(span.start..span.end)
            .unwrap_or("criterion")
            .to_string()
    }

    fn llm_export(&mut self, step: &Step, model: &str) -> Result<(), RunError> {
        let (rel, path, to_span) = self.export_target(step)?;
        let format = self
            .option(step, "format")
            .and_then(|f| f.as_str().map(String::from))
            .unwrap_or_else(|| "hf".into());
        let m = &self.llms[model];
        match format.as_str() {
            "compressed_24" => {
                llm::save_compressed(m, &path, 2, 4).map_err(rt_err_llm(to_span, "export"))?;
            }
            _ => {
                llm::save_hf(m, &path).map_err(rt_err_llm(to_span, "export"))?;
                // The recipe travels with the model (its lock is copied in
                // when the run ends, see `report::write_all`).
                std::fs::write(path.join("recipe.prune"), &self.r.source).map_err(|e| {
                    RunError::user(to_span, format!("cannot write the recipe: {e}"))
                })?;
                self.report.lock_copies.push(rel.clone());
            }
        }
        // Hash every file written.
        let mut files = Vec::new();
        if path.is_dir() {
            for e in std::fs::read_dir(&path).map_err(|e| RunError::Internal(e.to_string()))? {
                files.push(e.map_err(|e| RunError::Internal(e.to_string()))?.path());
            }
        } else {
            files.push(path.clone());
        }
        files.sort();
        let bytes = files
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
            .sum();
        self.report
            .exports
            .push((rel.display().to_string(), format.clone(), bytes));
        for f in files {
            let h = prunec_runtime::io::sha256_file(&f)
                .map_err(|e| RunError::Internal(e.to_string()))?;
            let rel_f = f
                .strip_prefix(&self.staging)
                .unwrap_or(&f)
                .display()
                .to_string();
            self.report.outputs.push((rel_f, h));
        }
        Ok(())
    }
}

/// The compiled criterion on one language-model layer: the same fused
/// score → select → mask kernels as classifiers (per row, per layer, N:M),
/// on the layer's weights and the activation norms the sequential driver
/// collected for it.
struct KernelPruner {
    method: String,
    expr: prunec_kernels::KExpr,
    reads_acts: bool,
    scope: Scope,
}

impl llm::LayerPruner for KernelPruner {
    fn method(&self) -> &str {
        &self.method
    }
    fn needs(&self) -> llm::StatsNeeds {
        llm::StatsNeeds {
            col_norms: self.reads_acts,
            hessian: false,
        }
    }
    fn prune_layer(&mut self, layer: llm::LayerToPrune<'_>) -> llm::Result<usize> {
        let (rows, cols) = (layer.rows, layer.cols);
        let keep = |n: usize, s: f64| ((n as f64) * (1.0 - s)).round() as usize;
        let selection = match layer.pattern {
            llm::SparsityPattern::NofM { n, m } => Selection::NM { n, m },
            llm::SparsityPattern::Unstructured(s) => match self.scope {
                Scope::Row => Selection::PerRow {
                    keep_per_row: keep(cols, s),
                },
                _ => Selection::PerTensor {
                    keep: vec![keep(rows * cols, s)],
                },
            },
        };
        let norms = if self.reads_acts {
            layer.stats.col_norms()
        } else {
            vec![]
        };
        let mut mask = prunec_kernels::full_mask(rows * cols);
        let mut view = TensorView::new(layer.name, rows, cols, layer.weight, &mut mask);
        if self.reads_acts {
            view.col_stats = vec![&norms];
        }
        let opts = PruneOptions {
            scalars: vec![0.0],
            allow_nonfinite: false,
            // Two passes: the layer's weights are written in place, so a
            // single pass that misses its sample could not start again.
            single_pass: false,
        };
        prunec_kernels::prune_jit(&self.expr, &selection, &mut [view], &opts)
            .map_err(|e| llm::RuntimeError::Invalid(format!("{}: {e}", layer.name)))?;
        let kept: usize = mask.iter().map(|w| w.count_ones() as usize).sum();
        Ok(rows * cols - kept)
    }
}

/// A layer pruner that advances a progress bar (with ETA) per pruned layer.
struct LayerProgress<'p> {
    inner: &'p mut dyn llm::LayerPruner,
    bar: Option<indicatif::ProgressBar>,
}

impl LayerProgress<'_> {
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl llm::LayerPruner for LayerProgress<'_> {
    fn method(&self) -> &str {
        self.inner.method()
    }
    fn needs(&self) -> llm::StatsNeeds {
        self.inner.needs()
    }
    fn prune_layer(&mut self, layer: llm::LayerToPrune<'_>) -> llm::Result<usize> {
        if let Some(b) = &self.bar {
            b.set_message(layer.name.to_string());
        }
        let r = self.inner.prune_layer(layer);
        if let Some(b) = &self.bar {
            b.inc(1);
        }
        r
    }
    fn take_armor(&mut self) -> Option<llm::armor::Armor> {
        self.inner.take_armor()
    }
}

/// A language model's parameter count (every tensor it holds, zeros too).
fn llm_params(m: &llm::LlamaModel, span: Span) -> Result<usize, RunError> {
    Ok(m.named_tensors()
        .map_err(rt_err_llm(span, "counting parameters"))?
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum())
}

impl Exec<'_> {
    /// Wraps `pruner` with a bar over the layers `config` selects (when progress is on).
    fn layer_progress<'p>(
        &self,
        model: &str,
        config: &llm::OneShotConfig,
        pruner: &'p mut dyn llm::LayerPruner,
    ) -> LayerProgress<'p> {
        let bar = self.progress.then(|| {
            let m = &self.llms[model];
            let total = m
                .linear_names()
                .into_iter()
                .filter(|n| {
                    config.targets.iter().any(|g| lower::glob_match(g, n))
                        && !config.skip.iter().any(|g| lower::glob_match(g, n))
                })
                .count();
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} layers, eta {eta} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(format!("prune {model} ({})", pruner.method()));
            b
        });
        LayerProgress { inner: pruner, bar }
    }
}

/// The keys each query may attend to: `floor(budget x seq)`, at least one
/// (the small tolerance keeps `30%` of 100 at 30 despite rounding).
fn kv_budget(kv: &crate::ir::KvCache, seq: usize) -> Result<llm::KvBudget, RunError> {
    let policy = llm::KvPolicy::named(&kv.policy)
        .ok_or_else(|| RunError::Internal(format!("unknown cache policy `{}`", kv.policy)))?;
    let keys = ((kv.budget * seq as f64 + 1e-9).floor() as usize).clamp(1, seq);
    Ok(llm::KvBudget { keys, policy })
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm::LayerPruner as _;
    use prunec_kernels::{KExpr, KInput, UnOp};

    /// The kernels' selections prune what the runtime's reference selection
    /// prunes, for magnitude per row, per layer and N:M (distinct scores: no
    /// ties; targets whose counts are whole, since the kernels keep
    /// `round(n (1 - s))` as on classifiers where the reference prunes
    /// `floor(n s)`).
    #[test]
    fn kernel_pruner_agrees_with_the_runtime_selection() {
        let (rows, cols) = (8, 64);
        let weights: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1009) as f32 - 500.0) / 97.0 + i as f32 * 1e-4)
            .collect();
        let magnitude = KExpr::un(UnOp::Abs, KExpr::Input(KInput::Weight));
        let stats = llm::prune::LayerStats::new(cols, llm::StatsNeeds::default());
        let cases = [
            (llm::SparsityPattern::NofM { n: 4, m: 8 }, Scope::Layer),
            (llm::SparsityPattern::NofM { n: 2, m: 4 }, Scope::Row),
            (llm::SparsityPattern::Unstructured(0.5), Scope::Row),
            (llm::SparsityPattern::Unstructured(0.25), Scope::Layer),
        ];
        for (pattern, scope) in cases {
            let mut ours = weights.clone();
            let mut pruner = KernelPruner {
                method: "magnitude".into(),
                expr: magnitude.clone(),
                reads_acts: false,
                scope,
            };
            let pruned = pruner
                .prune_layer(llm::LayerToPrune {
                    name: "w",
                    rows,
                    cols,
                    weight: &mut ours,
                    stats: &stats,
                    pattern,
                })
                .unwrap();
            let scores = llm::select::magnitude_scores(&weights);
            let rt_scope = match scope {
                Scope::Row => llm::Scope::Row,
                _ => llm::Scope::Layer,
            };
            let mask = llm::select::choose_pruned(&scores, rows, cols, pattern, rt_scope).unwrap();
            let mut theirs = weights.clone();
            let count = llm::select::apply_pruned(&mut theirs, &mask);
            assert_eq!(pruned, count, "{pattern:?} {scope:?}");
            assert_eq!(ours, theirs, "{pattern:?} {scope:?}");
        }
    }
}
