//! Checks of data-set prunes: `prune DATA by SCORE(MODEL) to FRACTION`.

use super::models::is_language_model;
use super::{Checker, SymKind, Value};
use crate::ast::*;
use crate::builtins::{self, Kind, Range, Ty};
use crate::diag::{Code, Diagnostic};
use crate::resolved::DataScore;
use std::collections::BTreeMap;

/// The options a data-set prune takes.
pub const DATA_PRUNE_OPTIONS: [&str; 2] = ["per_class", "keep"];

impl Checker<'_> {
    /// A `prune` stage whose subject is a data set.
    pub(super) fn check_prune_data(
        &mut self,
        s: &Stage,
        options: &BTreeMap<String, Value>,
        parent: Option<&Stage>,
        check_inner: &mut dyn FnMut(&mut Self, &Stage),
    ) {
        let data = s.subject.first().and_then(|e| e.as_name()).cloned();
        if let [_, second, ..] = s.subject.as_slice() {
            self.push(
                Diagnostic::new(Code::StageClause, "`prune` works on one data set")
                    .with_label(second.span, "unexpected second subject"),
            );
        }
        let usage = "a data set is pruned as `prune DATA by el2n(MODEL) to 70% (per_class = true)`";
        if let Some(p) = parent {
            self.push(
                Diagnostic::new(
                    Code::StageBlock,
                    "a data set is pruned at the top level of the pipeline",
                )
                .with_label(s.keyword_span, "nested data prune")
                .with_label(p.keyword_span, "inside this stage"),
            );
        }
        if let Some(on) = &s.on {
            self.push(
                Diagnostic::new(Code::StageClause, "a data set prune takes no `on` clause")
                    .with_label(on.span, "the data set is the subject")
                    .with_help(usage),
            );
        }
        if let Some(b) = &s.block {
            self.push(
                Diagnostic::new(Code::StageBlock, "a data set prune has no rounds")
                    .with_label(
                        Span::new(b.span.start, b.span.start + 1),
                        "block not allowed here",
                    )
                    .with_help(usage),
            );
        }
        for key in options.keys() {
            if !DATA_PRUNE_OPTIONS.contains(&key.as_str()) {
                self.push(
                    Diagnostic::new(
                        Code::StageClause,
                        format!("`{key}` is an option for pruning models, not a data set"),
                    )
                    .with_label(s.value_span(key), "not for a data set")
                    .with_help(format!(
                        "a data set prune takes {}",
                        DATA_PRUNE_OPTIONS.map(|o| format!("`{o}`")).join(" and ")
                    )),
                );
            }
        }
        // The data set must hold labelled samples.
        let ctor = data
            .as_ref()
            .and_then(|d| self.symbols.get(&d.name))
            .and_then(|sym| sym.value.as_ref())
            .and_then(|v| v.call_name())
            .map(String::from);
        if let (Some("text"), Some(d)) = (ctor.as_deref(), &data) {
            self.push(
                Diagnostic::new(
                    Code::Unsupported,
                    format!("`{}` is text: data pruning keeps labelled samples of image or feature data sets", d.name),
                )
                .with_label(d.span, "token sequences")
                .with_help("prune `mnist`, `fashion_mnist`, `digits`, `images` or `tensors` data"),
            );
        }
        // What scores.
        let mut scored: Option<(DataScore, Option<Ident>)> = None;
        if self.require(s, "by SCORE", s.by.is_some()) {
            let by = s.by.as_ref().unwrap();
            match &by.kind {
                ExprKind::Call { callee, args } if builtins::data_score(&callee.name).is_some() => {
                    let bi = builtins::data_score(&callee.name).unwrap();
                    if self.check_args(bi, args, callee.span).is_some() {
                        let model = args.items.first().and_then(|a| a.value.as_name()).cloned();
                        scored = DataScore::named(bi.name).map(|d| (d, model));
                    }
                }
                ExprKind::Name(id) if builtins::data_score(&id.name).is_some() => {
                    let bi = builtins::data_score(&id.name).unwrap();
                    match bi.params.first() {
                        Some(p) => self.push(
                            Diagnostic::new(
                                Code::MissingArgument,
                                format!("`{}` needs the model that scores", bi.name),
                            )
                            .with_label(id.span, format!("write `{}(MODEL)`", bi.name))
                            .with_help(p.doc),
                        ),
                        None => scored = DataScore::named(bi.name).map(|d| (d, None)),
                    }
                }
                _ => {
                    let names: Vec<String> = builtins::of_kind(Kind::DataScore)
                        .map(|b| {
                            if b.params.is_empty() {
                                format!("`{}()`", b.name)
                            } else {
                                format!("`{}(MODEL)`", b.name)
                            }
                        })
                        .collect();
                    self.push(
                        Diagnostic::new(
                            Code::WrongKind,
                            "a data set is pruned by a data score, not a weight criterion",
                        )
                        .with_label(by.span, "not a data score")
                        .with_help(format!("data scores: {}", names.join(", "))),
                    );
                }
            }
        }
        // The scoring model: a declared classifier.
        if let Some((_, Some(m))) = &scored {
            let is_model = self
                .symbols
                .get(&m.name)
                .is_some_and(|sym| sym.kind == SymKind::Model);
            if is_model && is_language_model(&self.symbols, &m.name) {
                self.push(
                    Diagnostic::new(
                        Code::Unsupported,
                        format!(
                            "`{}` is a language model: data scores are computed with classifiers",
                            m.name
                        ),
                    )
                    .with_label(m.span, "a language model")
                    .with_help("score with a classifier trained on the data set"),
                );
            }
        }
        // How much goes.
        if self.require(s, "to FRACTION", s.to.is_some()) {
            self.eval(s.to.as_ref().unwrap(), Ty::Fraction, Range::sparsity());
        }
        if let (Some((DataScore::Random, _)), Some(a)) = (&scored, s.arg("keep")) {
            self.push(
                Diagnostic::new(
                    Code::Unsupported,
                    "random scores have no hardest or easiest end",
                )
                .with_label(a.value.span, "has no effect on a random draw")
                .with_help("remove `keep`"),
            );
        }
        // Forgetting events are counted while the model trains on this data set.
        match (&scored, &s.during) {
            (Some((DataScore::Forgetting, model)), None) => {
                let m = model.as_ref().map_or("MODEL", |m| m.name.as_str());
                let d = data.as_ref().map_or("DATA", |d| d.name.as_str());
                self.push(
                    Diagnostic::new(
                        Code::StageBlock,
                        "forgetting events are counted while a model trains on the data set",
                    )
                    .with_label(
                        s.by.as_ref().map_or(s.keyword_span, |b| b.span),
                        "nothing trains",
                    )
                    .with_help(format!("add `during train {m} on {d} (epochs = ...)`")),
                );
            }
            (Some((score, model)), Some(d)) => {
                if *score != DataScore::Forgetting {
                    self.push(
                        Diagnostic::new(
                            Code::StageBlock,
                            format!("`{}` scores the model as it is: it does not run during training", score.name()),
                        )
                        .with_label(d.keyword_span, "not for this score")
                        .with_help("train first, then prune the data set; `forgetting(MODEL)` is the score counted during training"),
                    );
                } else {
                    // Forgetting is a correct presentation followed by a wrong
                    // one: every sample must be seen at least twice.
                    if let Some(a) = d.arg("steps") {
                        self.push(
                            Diagnostic::new(
                                Code::StageClause,
                                "forgetting events are counted over whole epochs: give `epochs`, not `steps`",
                            )
                            .with_label(a.value.span, "may leave samples unseen")
                            .with_help("write `epochs = N` with N >= 2"),
                        );
                    }
                    let epochs = d.arg("epochs").map(|a| &a.value);
                    let trains = matches!(d.kind, StageKind::Train | StageKind::Finetune);
                    let few = trains
                        && d.arg("steps").is_none()
                        && match epochs {
                            None => true,
                            Some(e) => self.constant_number(e).is_some_and(|n| n < 2.0),
                        };
                    if few {
                        self.push(
                            Diagnostic::new(
                                Code::OutOfRange,
                                "forgetting events need every sample presented at least twice",
                            )
                            .with_label(
                                epochs.map_or(d.keyword_span, |e| e.span),
                                "fewer than 2 epochs",
                            )
                            .with_help("train for `epochs = 2` or more"),
                        );
                    }
                    let trained = d.subject.first().and_then(|e| e.as_name());
                    let on = d.on.as_ref().and_then(|e| e.as_name());
                    if let (Some(m), Some(t)) = (model, trained) {
                        if m.name != t.name {
                            self.push(
                                Diagnostic::new(
                                    Code::StageBlock,
                                    format!(
                                        "forgetting events of `{}` are counted while `{}` trains",
                                        m.name, t.name
                                    ),
                                )
                                .with_label(t.span, format!("this trains `{}`", t.name))
                                .with_label(m.span, "the scoring model"),
                            );
                        }
                    }
                    if let (Some(data), Some(on)) = (&data, on) {
                        if data.name != on.name {
                            self.push(
                                Diagnostic::new(
                                    Code::StageBlock,
                                    format!("forgetting events of `{}` are counted while the model trains on it, not on `{}`", data.name, on.name),
                                )
                                .with_label(on.span, "other data")
                                .with_help(format!("train on `{}`", data.name)),
                            );
                        }
                    }
                }
            }
            _ => {}
        }
        if let Some(d) = &s.during {
            if !matches!(d.kind, StageKind::Train | StageKind::Finetune) {
                self.push(
                    Diagnostic::new(
                        Code::StageBlock,
                        format!(
                            "forgetting events are counted during `train` or `finetune`, not `{}`",
                            d.kind
                        ),
                    )
                    .with_label(d.keyword_span, "expected `train` or `finetune`"),
                );
            }
            check_inner(self, d);
        }
    }

    /// Options only a data-set prune takes, on a model prune.
    pub(super) fn forbid_data_options(&mut self, s: &Stage, options: &BTreeMap<String, Value>) {
        for key in DATA_PRUNE_OPTIONS {
            if options.contains_key(key) {
                self.push(
                    Diagnostic::new(
                        Code::StageClause,
                        format!("`{key}` is an option for pruning a data set, not a model"),
                    )
                    .with_label(s.value_span(key), "not for a model")
                    .with_help(
                        "`prune DATA by el2n(MODEL) to 70% (per_class = true, keep = hardest)`",
                    ),
                );
            }
        }
    }
}
