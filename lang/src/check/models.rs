//! What each kind of model can run. A `gguf(...)` or `hf(...)` model is a
//! causal language model, pruned one-shot block by block; every other model
//! is a classifier.
//! Stages, options, data and metrics that one kind cannot run are P045 here,
//! so that no recipe `check` accepts fails (or is quietly changed) at run time.

use super::Checker;
use crate::ast::*;
use crate::check::value::Value;
use crate::diag::{Code, Diagnostic};
use crate::resolved::{Method, Metric, Scope};
use std::collections::BTreeMap;

/// Whether a model constructor makes a causal language model.
pub fn is_language_model_constructor(name: &str) -> bool {
    matches!(name, "gguf" | "hf")
}

/// Whether the model declared as `name` is a language model.
pub fn is_language_model(symbols: &BTreeMap<String, super::Symbol>, name: &str) -> bool {
    symbols
        .get(name)
        .and_then(|s| s.value.as_ref())
        .and_then(|v| v.call_name())
        .is_some_and(is_language_model_constructor)
}

/// Whether the model declared as `name` is an ONNX graph (`onnx(...)`): a classifier that
/// is pruned one-shot and written back as `.onnx`.
pub fn is_onnx_model(symbols: &BTreeMap<String, super::Symbol>, name: &str) -> bool {
    symbols
        .get(name)
        .and_then(|s| s.value.as_ref())
        .and_then(|v| v.call_name())
        == Some("onnx")
}

/// The options of a prune stage that a language model's one-shot pruning
/// does not read, with what to write instead.
const LM_UNSUPPORTED: [(&str, &str); 3] = [
    (
        "schedule",
        "language models are pruned one-shot; remove `schedule`",
    ),
    (
        "rounds",
        "language models are pruned one-shot; remove `rounds`",
    ),
    (
        "allow_nonfinite",
        "language-model weights are always checked for NaN and inf; remove `allow_nonfinite`",
    ),
];

impl Checker<'_> {
    /// Checks every stage against the kind of model it runs on.
    pub(super) fn check_model_kinds(&mut self, p: &Pipeline) {
        for s in &p.stages {
            self.model_kind_stage(s);
        }
        self.check_text_data();
        self.check_data_splits();
    }

    fn subject_model(&self, s: &Stage) -> Option<(String, bool)> {
        let name = s.subject.first()?.as_name()?.name.clone();
        let sym = self.symbols.get(&name)?;
        // A model whose declaration did not evaluate (its error is reported
        // there) is of no known kind: nothing is said about its stages.
        (sym.kind == super::SymKind::Model && sym.value.is_some())
            .then(|| (name.clone(), is_language_model(&self.symbols, &name)))
    }

    fn dataset_constructor(&self, e: &Expr) -> Option<String> {
        let name = e.as_name()?;
        self.symbols
            .get(&name.name)
            .and_then(|s| s.value.as_ref())
            .and_then(|v| v.call_name())
            .map(String::from)
    }

    fn unsupported(&mut self, span: Span, message: String, label: &str, help: &str) {
        self.push(
            Diagnostic::new(Code::Unsupported, message)
                .with_label(span, label)
                .with_help(help),
        );
    }

    /// An option of a prune stage as resolved, with the span to show: where
    /// it is written, or the `constraints = NAME` that brings it in.
    fn prune_option(&self, s: &Stage, key: &str) -> Option<(Value, Span)> {
        let opts = self.stage_options.get(&s.id)?;
        if let Some(v) = opts.get(key) {
            return Some((v.clone(), s.value_span(key)));
        }
        let Some(Value::Ref(c)) = opts.get("constraints") else {
            return None;
        };
        match self.symbols.get(c).and_then(|s| s.value.as_ref()) {
            Some(Value::Call { args, .. }) => args
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| (v.clone(), s.value_span("constraints"))),
            _ => None,
        }
    }

    /// `kv_budget` / `kv_policy` on an evaluation: a language model's
    /// perplexity decoded with a bounded cache, nothing else.
    fn check_kv_cache(&mut self, s: &Stage, model: &str, lm: bool) {
        let opts = self.stage_options.get(&s.id);
        let budget = opts.is_some_and(|o| o.contains_key("kv_budget"));
        let policy = opts.is_some_and(|o| o.contains_key("kv_policy"));
        if !budget && !policy {
            return;
        }
        let key = if budget { "kv_budget" } else { "kv_policy" };
        let span = s.value_span(key);
        if !lm {
            self.unsupported(
                span,
                format!(
                    "`{key}` bounds a language model's key-value cache; `{model}` is a classifier"
                ),
                "for language models only",
                "evaluate a `gguf(...)` or `hf(...)` model on text with `-> [perplexity]`",
            );
            return;
        }
        if !budget {
            self.push(
                Diagnostic::new(
                    Code::MissingArgument,
                    "`kv_policy` chooses what a bounded cache keeps, but no `kv_budget` bounds it",
                )
                .with_label(span, "no effect without a budget")
                .with_help(
                    "add `kv_budget = 25%` (the share of the window each query may attend to)",
                ),
            );
        }
        let metrics: Vec<(String, Span)> = match s.out.as_ref().map(|o| (&o.kind, o)) {
            Some((ExprKind::List(v), _)) => v
                .iter()
                .filter_map(|e| e.as_name().map(|n| (n.name.clone(), e.span)))
                .collect(),
            Some((_, o)) => o
                .as_name()
                .map(|n| (n.name.clone(), o.span))
                .into_iter()
                .collect(),
            None => vec![],
        };
        for (name, mspan) in &metrics {
            if Metric::named(name).is_some_and(Metric::is_timing) {
                self.push(
                    Diagnostic::new(
                        Code::Unsupported,
                        format!("`{name}` times the plain forward pass; `{key}` bounds the cache of the perplexity evaluation only"),
                    )
                    .with_label(*mspan, "not decoded with the bounded cache")
                    .with_label(span, "bounds perplexity only")
                    .with_help(format!("time `{name}` in an evaluation of its own, without `{key}`")),
                );
            }
        }
        if !metrics.is_empty() && !metrics.iter().any(|(n, _)| n == "perplexity") {
            self.push(
                Diagnostic::new(
                    Code::Unsupported,
                    format!("`{key}` bounds the cache of the perplexity evaluation, and this stage does not evaluate `perplexity`"),
                )
                .with_label(span, "no effect here")
                .with_help("add `perplexity` to the metrics, or remove the option"),
            );
        }
    }

    fn model_kind_stage(&mut self, s: &Stage) {
        if let Some(b) = &s.block {
            for inner in &b.stages {
                self.model_kind_stage(inner);
            }
        }
        if let Some(d) = &s.during {
            self.model_kind_stage(d);
        }
        let Some((model, lm)) = self.subject_model(s) else {
            return;
        };
        // Data: language models read `text(...)`, classifiers read images and features.
        if let Some(on) = &s.on {
            if let Some(ctor) = self.dataset_constructor(on) {
                if lm && ctor != "text" && s.kind == StageKind::Evaluate {
                    self.unsupported(
                        on.span,
                        format!("the language model `{model}` is evaluated on `text(...)` data, not `{ctor}(...)`"),
                        "not text",
                        "declare `dataset d = text(\"PATH\", tokenizer = MODEL)`",
                    );
                }
                if !lm && ctor == "text" {
                    self.unsupported(
                        on.span,
                        format!("`{model}` is a classifier; `text(...)` data feeds language models (`gguf(...)`, `hf(...)`)"),
                        "token sequences",
                        "use an image or feature data set (`mnist`, `fashion_mnist`, `digits`, `images`, `tensors`)",
                    );
                }
            }
        }
        if let Some((Value::Ref(d), span)) = self.prune_option(s, "calibrate") {
            let ctor = self
                .symbols
                .get(&d)
                .and_then(|s| s.value.as_ref())
                .and_then(|v| v.call_name())
                .map(String::from);
            match (lm, ctor.as_deref()) {
                (true, Some(c)) if c != "text" => self.unsupported(
                    span,
                    format!("the language model `{model}` calibrates on `text(...)` data, not `{c}(...)`"),
                    "not text",
                    "declare `dataset d = text(\"PATH\", tokenizer = MODEL)`",
                ),
                (false, Some("text")) => self.unsupported(
                    span,
                    format!("`{model}` is a classifier; `text(...)` data calibrates language models"),
                    "token sequences",
                    "calibrate on an image or feature data set",
                ),
                _ => {}
            }
        }
        match s.kind {
            StageKind::Train | StageKind::Finetune | StageKind::Calibrate if lm => {
                self.unsupported(
                    s.keyword_span,
                    format!("`{}` stages on language models are not supported: prunec prunes them one-shot from calibration text", s.kind),
                    "not for a language model",
                    "prune with `calibrate = DATA` on the prune stage; evaluate with `evaluate MODEL on TEXT -> [perplexity]`",
                );
            }
            StageKind::Train | StageKind::Finetune if is_onnx_model(&self.symbols, &model) => {
                self.unsupported(
                    s.keyword_span,
                    format!("`{}` stages on the ONNX model `{model}` are not supported: ONNX graphs are pruned one-shot", s.kind),
                    "not for an ONNX graph",
                    "prune it by a criterion that needs no training (`magnitude`, `wanda`, `taylor`, ...) and evaluate it",
                );
            }
            StageKind::Analyze => self.model_kind_analyze(s, &model, lm),
            StageKind::Prune => self.model_kind_prune(s, &model, lm),
            StageKind::Train | StageKind::Finetune => self.check_distill(s, &model),
            StageKind::Evaluate => {
                self.check_kv_cache(s, &model, lm);
                let Some(out) = &s.out else { return };
                let items: Vec<&Expr> = match &out.kind {
                    ExprKind::List(v) => v.iter().collect(),
                    _ => vec![out],
                };
                for m in items {
                    let Some(name) = m.as_name().map(|n| n.name.as_str()) else {
                        continue;
                    };
                    let metric = Metric::named(name);
                    let ok = if lm {
                        matches!(
                            metric,
                            Some(
                                Metric::Perplexity
                                    | Metric::Sparsity
                                    | Metric::Params
                                    | Metric::Latency
                                    | Metric::Throughput
                            )
                        )
                    } else {
                        metric != Some(Metric::Perplexity)
                    };
                    if !ok {
                        let (what, help) = if lm {
                            (
                                "a language model",
                                "language models measure `perplexity`, `sparsity`, `params`, `latency` and `throughput`",
                            )
                        } else {
                            (
                                "a classifier",
                                "`perplexity` is measured on language models (`gguf(...)`, `hf(...)`)",
                            )
                        };
                        self.unsupported(
                            m.span,
                            format!("`{name}` cannot be measured on {what}"),
                            "not measured here",
                            help,
                        );
                    }
                }
            }
            StageKind::Export if self.armored.contains(&model) => {
                self.unsupported(
                    s.keyword_span,
                    format!("`{model}` was pruned by ARMOR, whose block-diagonal wrappers no export format holds yet: transformers' Llama layers have no place for them, and their product with the sparse weights is dense"),
                    "ARMOR's wrappers would be lost",
                    "evaluate the ARMOR model in the recipe; export a copy pruned by `sparsegpt()` or `wanda` for deployment",
                );
            }
            StageKind::Export => {
                let format = self
                    .stage_options
                    .get(&s.id)
                    .and_then(|o| o.get("format"))
                    .and_then(|v| v.as_str())
                    .map(String::from);
                if let (true, Some("compressed_24")) =
                    (self.compensated.contains(&model), format.as_deref())
                {
                    self.unsupported(
                        s.value_span("format"),
                        format!("`format = compressed_24` stores no biases; `compensate` gave `{model}` some"),
                        "loses the compensation",
                        "export it as a Hugging Face folder (`format = hf`), which declares `mlp_bias` / `attention_bias`",
                    );
                }
                if let (false, Some(f @ ("hf" | "compressed_24"))) = (lm, format.as_deref()) {
                    self.unsupported(
                        s.value_span("format"),
                        format!("`format = {f}` writes language models; `{model}` is a classifier"),
                        "for language models only",
                        "classifiers are exported as `format = safetensors`",
                    );
                }
                let onnx = is_onnx_model(&self.symbols, &model);
                if let (false, Some("onnx")) = (onnx, format.as_deref()) {
                    self.unsupported(
                        s.value_span("format"),
                        format!("`format = onnx` writes back `onnx(...)` models; `{model}` was not read from an ONNX graph"),
                        "for ONNX models only",
                        if lm {
                            "language models are exported as `format = hf` or `format = compressed_24`"
                        } else {
                            "classifiers are exported as `format = safetensors`"
                        },
                    );
                }
                if let (true, Some("safetensors")) = (onnx, format.as_deref()) {
                    self.unsupported(
                        s.value_span("format"),
                        format!("`format = safetensors` is not written for the ONNX model `{model}`"),
                        "not for an ONNX graph",
                        "ONNX models are exported as the same graph with the pruned weights: `format = onnx` (their default)",
                    );
                }
                if let (true, Some("safetensors")) = (lm, format.as_deref()) {
                    self.unsupported(
                        s.value_span("format"),
                        format!("`format = safetensors` writes classifiers; `{model}` is a language model"),
                        "for classifiers only",
                        "language models are exported as a Hugging Face folder (`format = hf`, the default for them) or `format = compressed_24`",
                    );
                }
            }
            _ => {}
        }
    }

    fn model_kind_prune(&mut self, s: &Stage, model: &str, lm: bool) {
        let method = s.by.as_ref().and_then(|by| match &by.kind {
            ExprKind::Call { callee, .. } => Method::named(&callee.name),
            ExprKind::Name(id) if !self.symbols.contains_key(&id.name) => Method::named(&id.name),
            _ => None,
        });
        let pattern = self
            .prune_option(s, "pattern")
            .map(|(v, span)| match &s.to {
                // `to 2:4`: the target is the pattern.
                Some(to) if s.arg("pattern").is_none() => (v, to.span),
                _ => (v, span),
            });
        self.check_pdp(s, pattern.as_ref());
        self.check_allocation(s, model, lm, method, pattern.as_ref());
        self.check_units(s, model, lm, method, pattern.as_ref().map(|p| p.1));
        self.check_expert_scores(s, model, lm, method);
        self.check_equal_widths(s);
        self.check_normalize(s, lm);
        self.check_compensate(s, lm);
        // A scope has no effect where a pattern decides the selection.
        if let (Some((_, pspan)), Some((scope, span))) = (&pattern, self.prune_option(s, "scope")) {
            if method != Some(Method::Sap) {
                let scope = scope.as_str().unwrap_or("?").to_string();
                self.push(
                    Diagnostic::new(
                        Code::Unsupported,
                        format!("`scope = {scope}` has no effect with a `pattern`"),
                    )
                    .with_label(span, "ignored by the pattern")
                    .with_label(*pspan, "the pattern decides what is kept")
                    .with_help("remove `scope`: an N:M pattern selects within each group of M weights, a block pattern within each tensor"),
                );
            }
        }
        if method == Some(Method::Armor) {
            let span = s.by.as_ref().map_or(s.keyword_span, |b| b.span);
            if !lm {
                self.unsupported(
                    span,
                    format!("`armor` wraps language-model layers; `{model}` is a classifier"),
                    "for language models only",
                    "prune classifiers by a criterion (`magnitude`, `wanda`, ...) or `sap`",
                );
            } else if pattern.is_none() {
                self.unsupported(
                    span,
                    "ARMOR wraps an N:M pattern: it needs `to 2:4` (or `pattern = N:M`)".into(),
                    "no N:M pattern",
                    "write `prune lm by armor() to 2:4 (calibrate = D)`; unstructured targets are SparseGPT's or Wanda's",
                );
            }
            self.armored.insert(model.to_string());
        }
        if !lm {
            if method == Some(Method::SparseGpt) {
                let span = s.by.as_ref().map_or(s.keyword_span, |b| b.span);
                self.unsupported(
                    span,
                    format!(
                        "`sparsegpt` reconstructs language-model layers; `{model}` is a classifier"
                    ),
                    "for language models only",
                    "prune classifiers by a criterion (`magnitude`, `wanda`, ...) or `sap`",
                );
            }
            for key in ["sequential", "true_sequential"] {
                if let Some((_, span)) = self.prune_option(s, key) {
                    self.unsupported(
                        span,
                        format!("`{key}` applies to language models; `{model}` is a classifier"),
                        "no effect on a classifier",
                        "remove it: a classifier's prune stage scores every layer from one calibration pass",
                    );
                }
            }
            if method == Some(Method::Sap) {
                for key in ["pattern", "keep_min", "keep_max", "schedule"] {
                    if let Some((_, span)) = self.prune_option(s, key) {
                        self.unsupported(
                            span,
                            format!("`sap` does not read `{key}`"),
                            "no effect with `sap`",
                            "SAP prunes unstructured weights each round by its PQ-index rule: remove it",
                        );
                    }
                }
                if let Some(to) = &s.to {
                    self.unsupported(
                        to.span,
                        "`sap` sets its own sparsity from the PQ index; it takes no `to` target"
                            .into(),
                        "no effect with `sap`",
                        "remove `to ...` and choose `rounds = N` (and `gamma`, `beta`)",
                    );
                }
                return;
            }
            self.check_guards(s, pattern.is_some());
            return;
        }
        for (key, help) in LM_UNSUPPORTED {
            if let Some((_, span)) = self.prune_option(s, key) {
                self.unsupported(
                    span,
                    format!("`{key}` is not supported when pruning the language model `{model}`"),
                    "not read by one-shot pruning",
                    help,
                );
            }
        }
        if let Some((v, span)) = &pattern {
            if v.call_name() == Some("block") {
                self.unsupported(
                    *span,
                    format!("block patterns are not supported on the language model `{model}`"),
                    "not for a language model",
                    "use an N:M pattern (`pattern = 2:4`) or an unstructured target (`to 50%`)",
                );
            }
        }
        if let Some(b) = &s.block {
            self.unsupported(
                Span::new(b.span.start, b.span.start + 1),
                format!("round blocks are not supported on the language model `{model}`"),
                "language models are pruned one-shot",
                "remove the block",
            );
        }
        if let Some(m @ (Method::Sap | Method::WoodFisher | Method::MFac)) = method {
            let span = s.by.as_ref().map_or(s.keyword_span, |b| b.span);
            self.unsupported(
                span,
                format!(
                    "`{}` is not supported on the language model `{model}`",
                    m.name()
                ),
                "for classifiers",
                "prune language models by a criterion (`wanda`, `magnitude`) or `sparsegpt()`",
            );
        }
        if let Some(m @ (Method::SparseGpt | Method::Armor)) = method {
            if let Some((_, span)) = self.prune_option(s, "scope") {
                self.unsupported(
                    span,
                    format!(
                        "`{}` selects by its own reconstruction error; it does not read `scope`",
                        m.name()
                    ),
                    &format!("no effect with `{}`", m.name()),
                    "remove `scope`",
                );
            }
            for key in ["keep_min", "keep_max"] {
                if let Some((_, span)) = self.prune_option(s, key) {
                    self.unsupported(
                        span,
                        format!("`sparsegpt` selects by its own reconstruction error; it does not read `{key}`"),
                        "no effect with `sparsegpt`",
                        &format!("remove `{key}`"),
                    );
                }
            }
        } else {
            // One threshold over every layer needs every layer's scores at
            // once: criteria that read activations are calibrated layer by
            // layer (each on the outputs of the layers pruned before it).
            if let (None, Some((v, span))) = (&pattern, self.prune_option(s, "scope")) {
                let units = self
                    .stage_options
                    .get(&s.id)
                    .is_some_and(|o| o.contains_key("unit"));
                if v.as_str() == Some("global") && self.stage_reads_acts.contains(&s.id) && !units {
                    self.unsupported(
                        span,
                        format!("`scope = global` with a criterion that reads `act(x)` is not supported on the language model `{model}`"),
                        "one threshold over every layer",
                        "its layers are calibrated one after another: write `scope = row` (the default) or `scope = layer`",
                    );
                }
            }
            self.check_guards(s, pattern.is_some());
        }
    }

    /// `compensate = true` adds the removed units' mean contribution to a
    /// language model's bias, from the calibration of an `act(x)` criterion.
    /// `schedule = pdp(...)`: soft masks by `w²`, so the criterion is
    /// magnitude; thresholds are global, per layer or per N:M group.
    /// A search allocates a language model's blocks; the other analyses
    /// study classifiers that train.
    fn model_kind_analyze(&mut self, s: &Stage, model: &str, lm: bool) {
        let Some(by) = &s.by else { return };
        let name = match &by.kind {
            ExprKind::Call { callee, .. } | ExprKind::Name(callee) => callee.name.as_str(),
            _ => return,
        };
        let onnx = is_onnx_model(&self.symbols, model);
        if name != "search" {
            if lm || onnx {
                let what = match name {
                    "oracle" => "the oracle study retrains copies of",
                    "agreement" => "criterion agreement reads the loss gradients of",
                    _ => "the sensitivity analysis measures the accuracy of",
                };
                self.unsupported(
                    s.keyword_span,
                    format!("{what} `{model}`: it runs on classifiers prunec trains (built-in architectures and safetensors models)"),
                    if lm { "not for a language model" } else { "not for an ONNX graph" },
                    "analyze a classifier declared with `mlp(...)`, `lenet5(...)` or `safetensors(...)`; a language model's blocks are searched with `by search(wanda)`",
                );
            }
            return;
        }
        if !lm {
            self.unsupported(
                s.keyword_span,
                format!("a search allocates sparsity over a language model's blocks; `{model}` is not a language model"),
                "not a language model",
                "search a model declared with `gguf(...)` or `hf(...)`; a classifier's layers share one global threshold with `scope = global`",
            );
            return;
        }
        // Candidates are masked per row by scores of the dense weights and
        // the `on` data's activations, and scored by perplexity on text.
        if let Some(on) = &s.on {
            if self.dataset_constructor(on).is_some_and(|c| c != "text") {
                self.unsupported(
                    on.span,
                    "a search scores candidates by perplexity on text".into(),
                    "not text data",
                    "search on a `text(...)` data set tokenized for the model",
                );
            }
        }
        if let ExprKind::Call { args, .. } = &by.kind {
            if let Some(a) = args.get("a", 0) {
                let ok = a.value.as_name().is_some_and(|n| {
                    matches!(n.name.as_str(), "wanda" | "magnitude")
                        && !self.symbols.contains_key(&n.name)
                });
                if !ok {
                    self.unsupported(
                        a.value.span,
                        "a search masks its candidates by `wanda` or `magnitude` scores".into(),
                        "not `wanda` or `magnitude`",
                        "write `search(wanda)` or `search(magnitude)`; the prune stage that picks a point may use any method",
                    );
                }
            }
        }
    }

    /// `allocation = owl(m, lambda)`: a language model's unstructured
    /// target spread over its blocks, from calibration activations, every
    /// block's sparsity in [0, 1).
    fn check_allocation(
        &mut self,
        s: &Stage,
        model: &str,
        lm: bool,
        method: Option<Method>,
        pattern: Option<&(Value, Span)>,
    ) {
        let Some((alloc, span)) = self.prune_option(s, "allocation") else {
            return;
        };
        if !lm {
            self.unsupported(
                span,
                format!("`allocation` spreads a language model's target over its blocks; `{model}` is a classifier"),
                "for language models only",
                "a classifier's `scope = global` already lets layers differ; per-layer amounts are `keep_min` / `keep_max`",
            );
            return;
        }
        if let Some((_, pspan)) = pattern {
            self.unsupported(
                *pspan,
                "an N:M pattern fixes every block's sparsity: `allocation` has nothing to spread"
                    .into(),
                "a fixed pattern",
                "give an unstructured target (`to 50%`) with `allocation`, or drop `allocation`",
            );
        }
        if let Some((_, uspan)) = self.prune_option(s, "unit") {
            self.unsupported(
                uspan,
                "`allocation` spreads a target of single weights; units are removed in the same number from every block".into(),
                "units",
                "drop `allocation` or `unit`",
            );
        }
        // One threshold over every layer (the default of criteria that read
        // the weights only) cannot follow per-block sparsities.
        let global = match self.prune_option(s, "scope") {
            Some((v, _)) => v.as_str() == Some("global"),
            None => method.is_none() && !self.stage_reads_acts.contains(&s.id),
        };
        if global {
            self.unsupported(
                span,
                "one global threshold over every layer cannot give each block its own sparsity"
                    .into(),
                "needs a threshold per layer or row",
                "add `scope = layer` (or `scope = row`)",
            );
        }
        if alloc.call_name() == Some("pareto") {
            self.check_pareto(s, model, &alloc, span);
            return;
        }
        if self.prune_option(s, "calibrate").is_none() && s.on.is_none() {
            self.push(
                Diagnostic::new(
                    Code::MissingData,
                    "OWL's outlier ratios read the layers' input activations, but no calibration data is given",
                )
                .with_label(span, "reads activations")
                .with_help("add `calibrate = DATASET` (text data)"),
            );
        }
        // Every block's sparsity, target − (scaled − mean) with the scaled
        // ratios in [0, 2λ], lies within target ± 2λ.
        let lambda = alloc.arg("lambda").and_then(|v| v.as_f64());
        let target = s.to.as_ref().and_then(|e| self.constant_number(e));
        if let (Some(l), Some(t)) = (lambda, target) {
            if t - 2.0 * l < 0.0 || t + 2.0 * l >= 1.0 {
                self.push(
                    Diagnostic::new(
                        Code::OutOfRange,
                        format!("with lambda = {l}, a block's sparsity may reach {:.4} .. {:.4}: outside [0, 1)", t - 2.0 * l, t + 2.0 * l),
                    )
                    .with_label(span, format!("lambda = {l}"))
                    .with_help(format!("choose lambda with the target ± 2 lambda inside [0, 1): at most {:.4}", (t.min(1.0 - t) / 2.0 - 1e-9).max(0.0))),
                );
            }
        }
    }

    /// `allocation = pareto(LABEL, pick)`: the front of an earlier search
    /// on the same model (or one declared from the same file); `pick =
    /// target` needs a `to` inside the searched range, `knee` none.
    fn check_pareto(&mut self, s: &Stage, model: &str, alloc: &Value, span: Span) {
        let Some(Value::Word(label)) = alloc.arg("front") else {
            return;
        };
        let Some(front) = self.fronts.get(label).cloned() else {
            let searches: Vec<String> = self.fronts.keys().map(|k| format!("`{k}`")).collect();
            self.push(
                Diagnostic::new(
                    Code::Undefined,
                    format!("`{label}` is not the label of a `search` analysis"),
                )
                .with_label(span, "no such front")
                .with_help(if searches.is_empty() {
                    "search first: `analyze MODEL on DATA by search(wanda) as front`, then `allocation = pareto(front)`".to_string()
                } else {
                    format!("the searches' labels: {}", searches.join(", "))
                }),
            );
            return;
        };
        if front.stage.start >= s.span.start {
            self.push(
                Diagnostic::new(
                    Code::StageClause,
                    format!("the front `{label}` is searched after this stage"),
                )
                .with_label(span, "read here")
                .with_label(front.stage, "searched here")
                .with_help("move the `analyze ... by search(...)` stage before the prune stage"),
            );
        }
        let source = |m: &str| self.symbols.get(m).and_then(|x| x.value.clone());
        if front.model != model && source(&front.model) != source(model) {
            self.push(
                Diagnostic::new(
                    Code::Unsupported,
                    format!(
                        "the front `{label}` holds sparsities for the blocks of `{}`, a different model from `{model}`",
                        front.model
                    ),
                )
                .with_label(span, format!("prunes `{model}`"))
                .with_label(front.stage, format!("searched on `{}`", front.model))
                .with_help(format!("search `{model}` itself, or a model declared from the same file")),
            );
        }
        let knee = alloc.arg("pick").and_then(|v| v.as_str()) == Some("knee");
        match (&s.to, knee) {
            (Some(to), true) => self.push(
                Diagnostic::new(
                    Code::StageClause,
                    "`pick = knee` prunes to the knee's own sparsity: the stage takes no `to`",
                )
                .with_label(to.span, "a second target")
                .with_label(span, "the knee decides the amount")
                .with_help(
                    "remove `to ...`, or pick the point meeting the target with `pick = target`",
                ),
            ),
            (Some(to), false) => {
                let target = self.constant_number(to);
                if let (Some(t), Some((lo, hi))) = (target, front.range) {
                    if t < lo - 1e-12 || t > hi + 1e-12 {
                        self.push(
                            Diagnostic::new(
                                Code::OutOfRange,
                                format!(
                                    "the front `{label}` spans {:.0}% .. {:.0}% sparsity: a target of {:.2}% is outside it",
                                    lo * 100.0,
                                    hi * 100.0,
                                    t * 100.0
                                ),
                            )
                            .with_label(to.span, "outside the searched range")
                            .with_label(front.stage, "searched here")
                            .with_help("choose a target inside the range, or widen the search's `range`"),
                        );
                    }
                }
            }
            (None, _) => {}
        }
    }

    fn check_pdp(&mut self, s: &Stage, pattern: Option<&(Value, Span)>) {
        let Some((sched, span)) = self.prune_option(s, "schedule") else {
            return;
        };
        let sched = match &sched {
            Value::Ref(n) => self
                .symbols
                .get(n)
                .and_then(|x| x.value.clone())
                .unwrap_or(sched.clone()),
            v => v.clone(),
        };
        if sched.call_name() != Some("pdp") {
            return;
        }
        let magnitude = s.by.as_ref().is_some_and(|by| {
            by.as_name()
                .is_some_and(|n| n.name == "magnitude" && !self.symbols.contains_key("magnitude"))
        });
        if !magnitude {
            let by_span = s.by.as_ref().map_or(s.keyword_span, |b| b.span);
            self.unsupported(
                by_span,
                "PDP's soft masks rank weights by w²: this criterion would be ignored".into(),
                "not read by `pdp`",
                "prune `by magnitude` (use std.magnitude) with `schedule = pdp(...)`",
            );
        }
        for key in ["keep_min", "keep_max"] {
            if let Some((_, kspan)) = self.prune_option(s, key) {
                self.unsupported(
                    kspan,
                    format!("`pdp` does not read `{key}`"),
                    "no effect with `pdp`",
                    "remove it: PDP's threshold is global, per layer or per N:M group",
                );
            }
        }
        if let Some((v, sspan)) = self.prune_option(s, "scope") {
            let scope = v.as_str().unwrap_or_default().to_string();
            if scope == "row" || scope == "neuron" {
                self.unsupported(
                    sspan,
                    format!(
                        "`pdp` takes its threshold globally or per layer, not `scope = {scope}`"
                    ),
                    "not with `pdp`",
                    "use `scope = global` or `scope = layer`",
                );
            }
        }
        if let Some((v, pspan)) = pattern {
            if v.call_name() == Some("block") {
                self.unsupported(
                    *pspan,
                    "`pdp` soft-masks single weights or N:M groups, not blocks".into(),
                    "not with `pdp`",
                    "use an N:M pattern or none",
                );
            }
            // An N:M pattern fixes the sparsity: a different `to` would be ignored.
            if let (Value::Pattern { n, m }, Some(to)) =
                (v, sched.arg("to").and_then(|t| t.as_f64()))
            {
                let fixed = 1.0 - *n as f64 / *m as f64;
                if (to - fixed).abs() > 1e-9 {
                    self.push(
                        Diagnostic::new(
                            Code::Unsupported,
                            format!("`pdp(to = {})` disagrees with the pattern `{n}:{m}`, which keeps {n} of every {m}", sched.arg("to").map_or(String::new(), |t| t.to_string())),
                        )
                        .with_label(span, "this target")
                        .with_label(*pspan, "fixes the sparsity")
                        .with_help(format!("write `to = {}%` (the pattern's sparsity)", fixed * 100.0)),
                    );
                }
            }
        }
    }

    /// `distill = TEACHER` (with `temperature`, `distill_weight`): another
    /// classifier with the same classes; the two options need it.
    fn check_distill(&mut self, s: &Stage, model: &str) {
        let opts = self.stage_options.get(&s.id).cloned().unwrap_or_default();
        let Some(teacher) = opts.get("distill") else {
            for key in ["temperature", "distill_weight"] {
                if opts.contains_key(key) {
                    self.unsupported(
                        s.value_span(key),
                        format!("`{key}` has no effect without `distill = TEACHER`"),
                        "no teacher to distill from",
                        "name the teacher model: `distill = teacher`, or remove it",
                    );
                }
            }
            return;
        };
        let Value::Ref(t) = teacher else { return };
        let span = s.value_span("distill");
        if t == model {
            return self.unsupported(
                span,
                format!("`{model}` cannot distill from itself"),
                "the model being trained",
                "declare a teacher model (trained earlier in the pipeline) and name it",
            );
        }
        if is_language_model(&self.symbols, t) {
            return self.unsupported(
                span,
                format!(
                    "`{t}` is a language model; distillation trains classifiers from a classifier"
                ),
                "not a classifier",
                "name a classifier with the student's classes",
            );
        }
        let classes = |name: &str| {
            self.symbols
                .get(name)
                .and_then(|s| s.value.as_ref())
                .and_then(|v| v.arg("classes"))
                .and_then(|v| v.as_i64())
        };
        if let (Some(a), Some(b)) = (classes(t), classes(model)) {
            if a != b {
                self.unsupported(
                    span,
                    format!("the teacher `{t}` has {a} classes, the student `{model}` {b}"),
                    "different classes",
                    "distill from a teacher over the same classes",
                );
            }
        }
    }

    fn check_compensate(&mut self, s: &Stage, lm: bool) {
        let Some((v, span)) = self.prune_option(s, "compensate") else {
            return;
        };
        let unit = self
            .stage_options
            .get(&s.id)
            .and_then(|o| o.get("unit"))
            .and_then(|u| u.as_str())
            .map(String::from);
        let lm_unit = matches!(unit.as_deref(), Some("ffn" | "kv_group" | "head"));
        if lm && lm_unit && matches!(v, Value::Bool(true)) {
            if let Some((model, _)) = self.subject_model(s) {
                self.compensated.insert(model);
            }
        }
        if !lm || !lm_unit {
            self.unsupported(
                span,
                "`compensate` adds removed units' mean contribution to a language model's bias: it needs `unit = ffn | kv_group | head` on a language model".into(),
                "no effect here",
                "remove `compensate`",
            );
        } else if matches!(v, Value::Bool(true)) && !self.stage_reads_acts.contains(&s.id) {
            self.unsupported(
                span,
                "`compensate` needs the calibration means that a criterion reading `act(x)` collects".into(),
                "no calibration means",
                "prune by such a criterion (`std.wanda`) with `calibrate = DATA`",
            );
        }
    }

    /// `normalize` scales each layer's unit scores before one global ranking:
    /// anywhere else it has no effect.
    fn check_normalize(&mut self, s: &Stage, lm: bool) {
        let Some((_, span)) = self.prune_option(s, "normalize") else {
            return;
        };
        let units = self
            .stage_options
            .get(&s.id)
            .is_some_and(|o| o.contains_key("unit"));
        let global = self
            .prune_option(s, "scope")
            .is_some_and(|(v, _)| v.as_str() == Some("global"));
        if !units || !global || lm {
            self.unsupported(
                span,
                "`normalize` scales each layer's unit scores for one ranking over all layers: it needs `unit = neuron | channel` and `scope = global`".into(),
                "no effect here",
                "remove `normalize`, or remove units globally",
            );
        }
    }

    /// `unit = ...` removes whole units of a sequential classifier, one-shot
    /// or in rounds; what cannot honour it is rejected here.
    fn check_units(
        &mut self,
        s: &Stage,
        model: &str,
        lm: bool,
        method: Option<Method>,
        pattern: Option<Span>,
    ) {
        let Some(unit) = self
            .stage_options
            .get(&s.id)
            .and_then(|o| o.get("unit"))
            .and_then(|v| v.as_str())
            .map(String::from)
        else {
            return;
        };
        let span = s.value_span("unit");
        let no = |this: &mut Self, message: String, label: &str, help: &str| {
            this.unsupported(span, message, label, help)
        };
        let lm_unit = matches!(
            unit.as_str(),
            "ffn" | "kv_group" | "head" | "expert" | "expert_neuron"
        );
        if lm && !lm_unit {
            return no(
                self,
                format!(
                    "`unit = {unit}` removes units of classifiers; `{model}` is a language model"
                ),
                "not for a language model",
                "remove FFN neurons (`unit = ffn`), key/value head groups (`unit = kv_group`), query heads (`unit = head`), experts (`unit = expert`) or atomic experts (`unit = expert_neuron`)",
            );
        }
        if !lm && lm_unit {
            return no(
                self,
                format!(
                    "`unit = {unit}` removes units of language models; `{model}` is a classifier"
                ),
                "for language models only",
                "remove hidden neurons (`unit = neuron`) or conv channels (`unit = channel`)",
            );
        }
        if s.to.is_none()
            && pattern.is_none()
            && s.during.is_none()
            && self.prune_option(s, "schedule").is_some()
        {
            // (Without a schedule, the missing target is reported generally.)
            no(
                self,
                format!(
                    "`unit = {unit}` removes a fraction of the units, but the stage has no `to`"
                ),
                "how many?",
                "add the fraction of units to remove: `to 50%`",
            );
        }
        if lm {
            // The Hugging Face configuration holds one size for every block.
            let alike = "every block loses the same number of units (the Hugging Face configuration holds one size for all blocks)";
            for (key, why) in [
                ("scope", alike),
                ("targets", alike),
                ("skip", alike),
                ("keep_min", alike),
                ("keep_max", alike),
                (
                    "sequential",
                    "units are scored on the dense model's activations, every block at once",
                ),
                (
                    "true_sequential",
                    "units are scored on the dense model's activations, every block at once",
                ),
            ] {
                if let Some((v, kspan)) = self.prune_option(s, key) {
                    // `row` is reported below, as for every unit.
                    if key == "scope" && matches!(v.as_str(), Some("layer" | "row" | "neuron")) {
                        continue;
                    }
                    // Atomic experts may be ranked across every sparse block.
                    if key == "scope" && unit == "expert_neuron" && v.as_str() == Some("global") {
                        continue;
                    }
                    self.unsupported(
                        kspan,
                        format!("`{key}` has no place with `unit = {unit}` on the language model `{model}`: {why}"),
                        "not with language-model units",
                        &format!("remove `{key}`"),
                    );
                }
            }
        }
        if is_onnx_model(&self.symbols, model) {
            return no(
                self,
                format!("`unit = {unit}` is not supported on the ONNX model `{model}`: which tensors move with a unit is not derived for graphs"),
                "not for an ONNX graph",
                "prune its weights unstructured, or use a built-in architecture",
            );
        }
        let experts = matches!(unit.as_str(), "expert" | "expert_neuron");
        if experts != method.is_some_and(|m| m.scores_experts()) {
            // `check_expert_scores` reports an expert score on other units.
            if experts {
                return no(
                    self,
                    format!("`unit = {unit}` is scored by an expert score: `heapr`, `reap` or `frequency`"),
                    "experts are not scored by weights",
                    "write `prune lm by heapr to 25% (unit = expert_neuron, calibrate = D)` (`use std.heapr`)",
                );
            }
            return;
        }
        if let Some(
            m @ (Method::SparseGpt
            | Method::Sap
            | Method::WoodFisher
            | Method::MFac
            | Method::Armor),
        ) = method
        {
            let name = m.name();
            return no(
                self,
                format!("`{name}` prunes single weights; `unit = {unit}` removes whole units"),
                "not with this method",
                if lm {
                    "score units by a criterion that reads weights and activations (`wanda`, `magnitude`)"
                } else {
                    "score units by a criterion (`l1_channel`, `l2_channel`, `taylor`, ...)"
                },
            );
        }
        if let Some(p) = pattern {
            self.push(
                Diagnostic::new(
                    Code::Unsupported,
                    format!("a pattern keeps some weights of every group; `unit = {unit}` removes whole units"),
                )
                .with_label(span, "whole units")
                .with_label(p, "weights within groups")
                .with_help("choose one: remove `unit`, or the pattern"),
            );
            return;
        }
        if let Some((v, sspan)) = self.prune_option(s, "scope") {
            if matches!(v.as_str(), Some("row" | "neuron")) {
                self.unsupported(
                    sspan,
                    format!(
                        "`unit = {unit}` compares units per layer or globally, not within a row"
                    ),
                    "not for units",
                    "write `scope = layer` (the default for units) or `scope = global`",
                );
            }
        }
        if let Some(d) = &s.during {
            self.unsupported(
                d.keyword_span,
                format!("`unit = {unit}` removes units at once and shrinks the model; it cannot prune during training"),
                "not with units",
                "prune one-shot or in rounds (`schedule = iterative(rounds = 3)`), then fine-tune",
            );
        }
    }

    /// `equal_widths` shapes an `expert_neuron` selection, which it makes
    /// per expert (a scope would have nothing to rank across).
    fn check_equal_widths(&mut self, s: &Stage) {
        let Some((v, span)) = self.prune_option(s, "equal_widths") else {
            return;
        };
        let unit = self
            .stage_options
            .get(&s.id)
            .and_then(|o| o.get("unit"))
            .and_then(|u| u.as_str());
        if unit != Some("expert_neuron") {
            return self.unsupported(
                span,
                "`equal_widths` decides how atomic experts are removed: it needs `unit = expert_neuron`".into(),
                "no effect here",
                "remove `equal_widths`",
            );
        }
        if let (Value::Bool(true), Some((_, sspan))) = (v, self.prune_option(s, "scope")) {
            self.unsupported(
                sspan,
                "with `equal_widths = true` each expert loses its own lowest-scored atomic experts: there is no scope to rank across".into(),
                "no effect with `equal_widths`",
                "remove `scope`, or `equal_widths` to rank across the experts",
            );
        }
    }

    /// `heapr`, `reap` and `frequency` score experts of a language model:
    /// they need `unit = expert` (or `expert_neuron`, but for `frequency`,
    /// which counts tokens per expert).
    fn check_expert_scores(&mut self, s: &Stage, model: &str, lm: bool, method: Option<Method>) {
        let Some(m) = method.filter(|m| m.scores_experts()) else {
            return;
        };
        let span = s.by.as_ref().map_or(s.keyword_span, |b| b.span);
        let name = m.name();
        if !lm {
            return self.unsupported(
                span,
                format!("`{name}` scores the experts of a mixture-of-experts language model; `{model}` is a classifier"),
                "for language models with experts",
                "prune classifiers by a criterion (`magnitude`, `taylor`, ...)",
            );
        }
        let unit = self
            .stage_options
            .get(&s.id)
            .and_then(|o| o.get("unit"))
            .and_then(|v| v.as_str())
            .map(String::from);
        match unit.as_deref() {
            Some("expert") => {}
            Some("expert_neuron") if m != Method::Frequency => {}
            Some("expert_neuron") => self.unsupported(
                s.value_span("unit"),
                "`frequency` counts the tokens routed to each expert: every atomic expert of an expert would tie".into(),
                "not for atomic experts",
                "remove whole experts (`unit = expert`), or score atomic experts by `heapr` or `reap`",
            ),
            _ => self.unsupported(
                span,
                format!("`{name}` scores experts: the stage needs `unit = expert` or `unit = expert_neuron`"),
                "scores experts, not weights",
                "add `unit = expert` (whole experts) or `unit = expert_neuron` (atomic experts) to the stage's options",
            ),
        }
    }

    /// `keep_min` / `keep_max` guard the layers of one global selection:
    /// anywhere else they have no effect.
    fn check_guards(&mut self, s: &Stage, pattern: bool) {
        let unit_value = self
            .stage_options
            .get(&s.id)
            .and_then(|o| o.get("unit"))
            .and_then(|v| v.as_str());
        if matches!(
            unit_value,
            Some("ffn" | "kv_group" | "head" | "expert" | "expert_neuron")
        ) {
            // `check_units` says why a language model's units take no guards.
            return;
        }
        let scope = self.prune_option(s, "scope").map(|(v, _)| v);
        let unit =
            crate::resolved::Unit::of(self.stage_options.get(&s.id).and_then(|o| o.get("unit")));
        let global = Scope::of_stage(scope.as_ref(), self.stage_reads_acts.contains(&s.id), unit)
            == Scope::Global;
        if !global || pattern {
            for key in ["keep_min", "keep_max"] {
                if let Some((_, span)) = self.prune_option(s, key) {
                    let why = if pattern {
                        "a `pattern` decides what each layer keeps"
                    } else {
                        "each layer or row is pruned to the target by itself"
                    };
                    self.unsupported(
                        span,
                        format!("`{key}` guards the layers of a `scope = global` selection; {why}"),
                        "no effect here",
                        &format!("remove `{key}`, or prune with `scope = global`"),
                    );
                }
            }
        }
    }

    /// `text(tokenizer = M)` needs a language model's tokenizer.
    fn check_text_data(&mut self) {
        let mut bad = Vec::new();
        for (name, sym) in &self.symbols {
            let Some(v) = &sym.value else { continue };
            if v.call_name() != Some("text") {
                continue;
            }
            if let Some(Value::Ref(m)) = v.arg("tokenizer") {
                let known = self.symbols.get(m).is_some_and(|t| t.value.is_some());
                if known && !is_language_model(&self.symbols, m) {
                    bad.push((name.clone(), m.clone(), sym.span));
                }
            }
        }
        for (name, m, span) in bad {
            self.unsupported(
                span,
                format!("the text data set `{name}` is cut by the tokenizer of `{m}`, which is not a language model"),
                "no tokenizer",
                "name a language model (`gguf(...)` or `hf(...)`): `tokenizer = lm`",
            );
        }
    }

    /// `validation = F` holds out the last fraction of the train file: the
    /// `train` split leaves it out and the `validation` split reads it, so it
    /// means nothing on the test split, and a validation split needs it.
    ///
    /// `images` and `tensors` read one pool of samples whose last `test`
    /// fraction is the test split: data sets on the same pool must agree on
    /// it, and with `test = 0%` they cannot be both a train and a test split.
    fn check_data_splits(&mut self) {
        let mut bad = Vec::new();
        // (constructor, path) -> (data set, split, test fraction) of each use.
        type Uses = Vec<(String, String, f64)>;
        let mut pools: BTreeMap<(String, String), Uses> = BTreeMap::new();
        for (name, sym) in &self.symbols {
            let Some(v) = &sym.value else { continue };
            let ctor = v.call_name().unwrap_or("");
            if !matches!(
                ctor,
                "mnist" | "fashion_mnist" | "digits" | "images" | "tensors"
            ) {
                continue;
            }
            let split = v.arg("split").and_then(|s| s.as_str()).unwrap_or("train");
            if matches!(ctor, "images" | "tensors") {
                let path = v.arg("path").and_then(|p| p.as_str()).unwrap_or("");
                let test = v.arg("test").and_then(|f| f.as_f64()).unwrap_or(0.0);
                pools
                    .entry((ctor.to_string(), path.to_string()))
                    .or_default()
                    .push((name.clone(), split.to_string(), test));
            }
            if let Some(Value::List(size)) = v.arg("size") {
                if !(size.is_empty() || size.len() == 2) {
                    bad.push((
                        sym.span,
                        format!(
                            "`size` of `{name}` has {} numbers; it is `[height, width]`",
                            size.len()
                        ),
                        "write `size = [28, 28]`, or leave it out to keep the images' own size",
                    ));
                }
            }
            // A per-channel mean or std has one value per channel.
            let channels = if v.arg("color").and_then(|c| c.as_str()) == Some("gray") {
                1
            } else {
                3
            };
            for key in ["mean", "std"] {
                if let Some(Value::List(vals)) = v.arg(key) {
                    if ctor == "images" && vals.len() != 1 && vals.len() != channels {
                        bad.push((
                            sym.span,
                            format!(
                                "`{key}` of `{name}` has {} values; its images have {channels} channel(s)",
                                vals.len()
                            ),
                            "give one value for all channels, or one per channel",
                        ));
                    }
                }
            }
            let held = v.arg("validation").and_then(|f| f.as_f64()).unwrap_or(0.0);
            match v.arg("split").and_then(|s| s.as_str()) {
                Some("test") if held > 0.0 => bad.push((
                    sym.span,
                    format!("`validation` holds out part of the train file; the test split of `{name}` does not read it"),
                    "remove `validation`, or read `split = \"validation\"`",
                )),
                Some("validation") if held <= 0.0 => bad.push((
                    sym.span,
                    format!("the validation split of `{name}` is empty: nothing is held out"),
                    "hold out part of the train file: `validation = 10%`",
                )),
                _ => {}
            }
        }
        for ((_, path), uses) in pools {
            let (first, _, test) = &uses[0];
            if let Some((other, _, t)) = uses.iter().find(|u| u.2 != *test) {
                let span = self.symbols[other].span;
                bad.push((
                    span,
                    format!("`{first}` holds out `test = {}%` of {path:?} but `{other}` holds out {}%: their train and test splits would overlap", test * 100.0, t * 100.0),
                    "give every data set on the same samples the same `test` fraction",
                ));
                continue;
            }
            let train = uses.iter().find(|u| u.1 != "test");
            let tested = uses.iter().find(|u| u.1 == "test");
            if let (Some((a, _, _)), Some((b, _, _)), true) = (train, tested, *test == 0.0) {
                let span = self.symbols[b].span;
                bad.push((
                    span,
                    format!("`{a}` and `{b}` read the same samples of {path:?}: without a `test` fraction the test split is the whole data set"),
                    "hold out a test part on both (`test = 20%`), or point the test split at another folder or file",
                ));
            }
        }
        for (span, message, help) in bad {
            self.unsupported(span, message, "this data set", help);
        }
    }
}
