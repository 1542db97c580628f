//! Diagnostics: error codes, labelled spans and help, rendered by miette at the CLI.

use crate::ast::Span;
use serde::Serialize;
use std::fmt;

/// Every diagnostic code prunec emits. `spec/ERRORS.md` documents each one;
/// a test checks that the two agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Code {
    NotUtf8,
    Syntax,
    TooDeep,
    TooLarge,
    Empty,
    Header,
    Undefined,
    Duplicate,
    WrongKind,
    UnknownImport,
    UnknownFunction,
    UnknownArgument,
    MissingArgument,
    WrongType,
    OutOfRange,
    DuplicateArgument,
    TooManyArguments,
    BadPattern,
    MissingData,
    MetricNotEvaluated,
    UnknownMetric,
    StageClause,
    StageBlock,
    Unsupported,
    Override,
    ModelFile,
    ShapeMismatch,
    NoMatch,
    DataFile,
}

impl Code {
    pub const ALL: [Code; 29] = [
        Code::NotUtf8,
        Code::Syntax,
        Code::TooDeep,
        Code::TooLarge,
        Code::Empty,
        Code::Header,
        Code::Undefined,
        Code::Duplicate,
        Code::WrongKind,
        Code::UnknownImport,
        Code::UnknownFunction,
        Code::UnknownArgument,
        Code::MissingArgument,
        Code::WrongType,
        Code::OutOfRange,
        Code::DuplicateArgument,
        Code::TooManyArguments,
        Code::BadPattern,
        Code::MissingData,
        Code::MetricNotEvaluated,
        Code::UnknownMetric,
        Code::StageClause,
        Code::StageBlock,
        Code::Unsupported,
        Code::Override,
        Code::ModelFile,
        Code::ShapeMismatch,
        Code::NoMatch,
        Code::DataFile,
    ];

    /// The code as printed, e.g. `P002`.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::NotUtf8 => "P001",
            Code::Syntax => "P002",
            Code::TooDeep => "P003",
            Code::TooLarge => "P004",
            Code::Empty => "P005",
            Code::Header => "P006",
            Code::Undefined => "P010",
            Code::Duplicate => "P011",
            Code::WrongKind => "P012",
            Code::UnknownImport => "P013",
            Code::UnknownFunction => "P020",
            Code::UnknownArgument => "P021",
            Code::MissingArgument => "P022",
            Code::WrongType => "P023",
            Code::OutOfRange => "P024",
            Code::DuplicateArgument => "P025",
            Code::TooManyArguments => "P026",
            Code::BadPattern => "P030",
            Code::MissingData => "P040",
            Code::MetricNotEvaluated => "P041",
            Code::UnknownMetric => "P042",
            Code::StageClause => "P043",
            Code::StageBlock => "P044",
            Code::Unsupported => "P045",
            Code::Override => "P050",
            Code::ModelFile => "P060",
            Code::ShapeMismatch => "P061",
            Code::NoMatch => "P062",
            Code::DataFile => "P063",
        }
    }

    /// A one-line title, as listed in `spec/ERRORS.md`.
    pub fn title(self) -> &'static str {
        match self {
            Code::NotUtf8 => "the recipe is not UTF-8 text",
            Code::Syntax => "syntax error",
            Code::TooDeep => "nesting too deep",
            Code::TooLarge => "file too large",
            Code::Empty => "empty recipe",
            Code::Header => "bad or missing recipe header",
            Code::Undefined => "undefined name",
            Code::Duplicate => "duplicate definition",
            Code::WrongKind => "a name of the wrong kind",
            Code::UnknownImport => "unknown import",
            Code::UnknownFunction => "unknown function",
            Code::UnknownArgument => "unknown argument",
            Code::MissingArgument => "missing argument",
            Code::WrongType => "wrong type",
            Code::OutOfRange => "value out of range",
            Code::DuplicateArgument => "argument given twice",
            Code::TooManyArguments => "too many positional arguments",
            Code::BadPattern => "invalid N:M pattern",
            Code::MissingData => "criterion needs data the stage does not provide",
            Code::MetricNotEvaluated => "assert on a metric no earlier stage evaluates",
            Code::UnknownMetric => "unknown metric",
            Code::StageClause => "clause not allowed or missing in a stage",
            Code::StageBlock => "misplaced stage block",
            Code::Unsupported => "not supported by this model kind or the runtime",
            Code::Override => "bad `--set` override",
            Code::ModelFile => "model file unreadable",
            Code::ShapeMismatch => "shapes do not fit",
            Code::NoMatch => "selection matches no parameter",
            Code::DataFile => "data file unreadable",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A labelled span inside the recipe.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Label {
    pub span: Span,
    pub text: String,
}

/// One problem found in a recipe.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Diagnostic {
    pub code: Code,
    pub message: String,
    /// The first label is the primary one.
    pub labels: Vec<Label>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Diagnostic {
            code,
            message: message.into(),
            labels: Vec::new(),
            help: None,
        }
    }

    pub fn with_label(mut self, span: Span, text: impl Into<String>) -> Self {
        self.labels.push(Label {
            span,
            text: text.into(),
        });
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn with_help_opt(mut self, help: Option<String>) -> Self {
        if help.is_some() {
            self.help = help;
        }
        self
    }

    /// The primary span (the first label's), if any.
    pub fn primary_span(&self) -> Option<Span> {
        self.labels.first().map(|l| l.span)
    }

    /// Sort key: by position, then code, then message, so output is stable.
    pub fn sort_key(&self) -> (usize, usize, Code, String) {
        let s = self.primary_span().unwrap_or_default();
        (s.start, s.end, self.code, self.message.clone())
    }

    /// Moves every span by `by` bytes (for sub-parses of a file).
    pub fn shifted(mut self, by: usize) -> Self {
        for l in &mut self.labels {
            l.span = l.span.shifted(by);
        }
        self
    }

    /// Ties this diagnostic to its source for rendering with miette.
    pub fn with_source(&self, name: &str, src: &str) -> SourcedDiagnostic {
        SourcedDiagnostic {
            diag: self.clone(),
            src: miette::NamedSource::new(name, src.to_string()),
        }
    }

    /// The JSON-lines form used by `prunec check --format json`.
    pub fn to_json(&self, file: &str, src: &str) -> serde_json::Value {
        let span = self.primary_span().unwrap_or_default();
        let (line, column) = line_col(src, span.start);
        let (end_line, end_column) = line_col(src, span.end);
        serde_json::json!({
            "file": file,
            "line": line,
            "column": column,
            "end": { "line": end_line, "column": end_column },
            "code": self.code.as_str(),
            "message": self.message,
            "help": self.help,
            "labels": self.labels.iter().map(|l| {
                let (line, column) = line_col(src, l.span.start);
                serde_json::json!({"line": line, "column": column, "text": l.text})
            }).collect::<Vec<_>>(),
        })
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(src.len());
    while !src.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, before[line_start..].chars().count() + 1)
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A diagnostic with the source it points into, ready for miette.
#[derive(Debug)]
pub struct SourcedDiagnostic {
    diag: Diagnostic,
    src: miette::NamedSource<String>,
}

impl fmt::Display for SourcedDiagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.diag.message)
    }
}

impl std::error::Error for SourcedDiagnostic {}

impl miette::Diagnostic for SourcedDiagnostic {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.diag.code.as_str()))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.diag
            .help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.src)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = miette::LabeledSpan> + '_>> {
        if self.diag.labels.is_empty() {
            return None;
        }
        let len = self.src.inner().len();
        Some(Box::new(self.diag.labels.iter().enumerate().map(
            move |(i, l)| {
                let start = l.span.start.min(len);
                let end = l.span.end.clamp(start, len);
                let text = (!l.text.is_empty()).then(|| l.text.clone());
                if i == 0 {
                    miette::LabeledSpan::new_primary_with_span(text, (start, end - start))
                } else {
                    miette::LabeledSpan::new_with_span(text, (start, end - start))
                }
            },
        )))
    }
}

/// "did you mean `x`?" for the closest candidate, if one is close enough.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let mut best: Option<(f64, &str)> = None;
    for c in candidates {
        let score = strsim::jaro_winkler(name, c);
        let close =
            score > 0.82 || strsim::levenshtein(name, c) <= 2.min(name.len().saturating_sub(1));
        if close && best.is_none_or(|(b, _)| score > b) {
            best = Some((score, c));
        }
    }
    best.map(|(_, c)| format!("did you mean `{c}`?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_documented_in_the_spec() {
        let spec = include_str!("../../spec/ERRORS.md");
        for code in Code::ALL {
            let row = format!("| {} | {} |", code.as_str(), code.title());
            assert!(spec.contains(&row), "spec/ERRORS.md lacks the row `{row}`");
        }
        let rows = spec.lines().filter(|l| l.starts_with("| P")).count();
        assert_eq!(
            rows,
            Code::ALL.len(),
            "spec/ERRORS.md documents codes that do not exist"
        );
    }
}
