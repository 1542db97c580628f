//! Error recovery: cuts a file into declarations and pipeline stages with a
//! bracket-aware scan, so each piece is parsed alone and every error is found.

use super::{build_item, build_stage, errors, RecipeParser, Rule, MAX_NESTING};
use crate::ast::{Item, Pipeline, Span};
use crate::diag::{Code, Diagnostic};
use pest::Parser as _;

/// Words that start a top-level item.
const TOP_KEYWORDS: [&str; 9] = [
    "recipe",
    "use",
    "param",
    "model",
    "dataset",
    "criterion",
    "schedule",
    "constraints",
    "pipeline",
];

/// Words that start a stage.
const STAGE_KEYWORDS: [&str; 9] = [
    "train",
    "finetune",
    "calibrate",
    "prune",
    "evaluate",
    "assert",
    "export",
    "report",
    "analyze",
];

/// The longest run of prefix operators (`- - x`) accepted.
const MAX_PREFIX_RUN: usize = 64;
/// The most `during` clauses accepted in one file.
const MAX_DURING: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq)]
enum TokKind {
    Word,
    Open,
    Close,
    Str,
    Other,
}

#[derive(Clone, Copy, Debug)]
struct Tok {
    start: usize,
    end: usize,
    kind: TokKind,
    /// First token on its line.
    line_start: bool,
    /// Starts in column 0.
    column0: bool,
}

impl Tok {
    fn text<'a>(&self, src: &'a str) -> &'a str {
        &src[self.start..self.end]
    }
}

/// A rough lexer: words, brackets, strings; comments and whitespace skipped.
fn scan(src: &str) -> Vec<Tok> {
    let bytes = src.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    let mut line_start = true;
    let mut column0 = true;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\n' => {
                line_start = true;
                column0 = true;
                i += 1;
                continue;
            }
            b' ' | b'\t' | b'\r' => {
                column0 = false;
                i += 1;
                continue;
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        let start = i;
        let kind = if c == b'"' {
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(bytes.len());
            TokKind::Str
        } else if c.is_ascii_alphanumeric() || c == b'_' {
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            TokKind::Word
        } else if matches!(c, b'(' | b'[' | b'{') {
            i += 1;
            TokKind::Open
        } else if matches!(c, b')' | b']' | b'}') {
            i += 1;
            TokKind::Close
        } else {
            // One character (stepping over a whole UTF-8 sequence).
            i += 1;
            while i < bytes.len() && !src.is_char_boundary(i) {
                i += 1;
            }
            TokKind::Other
        };
        toks.push(Tok {
            start,
            end: i.min(src.len()),
            kind,
            line_start,
            column0,
        });
        line_start = false;
        column0 = false;
    }
    toks
}

/// Reports input nested so deeply that parsing it would be unreasonable.
pub(super) fn nesting_error(src: &str) -> Option<Diagnostic> {
    let toks = scan(src);
    let mut depth = 0usize;
    let mut prefix_run = 0usize;
    let mut during = 0usize;
    for t in &toks {
        match t.kind {
            TokKind::Open => depth += 1,
            TokKind::Close => depth = depth.saturating_sub(1),
            _ => {}
        }
        let text = t.text(src);
        if text == "-" || text == "not" {
            prefix_run += 1;
        } else {
            prefix_run = 0;
        }
        if text == "during" {
            during += 1;
        }
        let too_deep = depth > MAX_NESTING || prefix_run > MAX_PREFIX_RUN || during > MAX_DURING;
        if too_deep {
            return Some(
                Diagnostic::new(Code::TooDeep, "this is nested too deeply to be a recipe")
                    .with_label(Span::new(t.start, t.end), "nesting limit exceeded here")
                    .with_help(format!(
                        "prunec accepts at most {MAX_NESTING} nested brackets, {MAX_PREFIX_RUN} prefix operators in a row and {MAX_DURING} `during` clauses"
                    )),
            );
        }
    }
    None
}

/// A piece of the token stream: `toks[lo..hi]`.
#[derive(Clone, Copy)]
struct Piece {
    lo: usize,
    hi: usize,
}

/// Splits `toks[lo..hi]` where `starts(i, depth)` says a new piece begins,
/// tracking bracket depth (a keyword in column 0 resets it, so one
/// unbalanced bracket does not swallow the rest of the file).
fn split(
    toks: &[Tok],
    lo: usize,
    hi: usize,
    mut starts: impl FnMut(usize, usize) -> bool,
    reset_at_column0: bool,
) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut depth = 0usize;
    let mut cur = lo;
    for (i, &t) in toks.iter().enumerate().take(hi).skip(lo) {
        if reset_at_column0 && t.column0 && depth > 0 && starts(i, 0) {
            depth = 0;
        }
        if i > cur && starts(i, depth) {
            pieces.push(Piece { lo: cur, hi: i });
            cur = i;
        }
        match t.kind {
            TokKind::Open => depth += 1,
            TokKind::Close => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if cur < hi {
        pieces.push(Piece { lo: cur, hi });
    }
    pieces
}

/// Splits `toks[lo..hi]` where `starts(i)` holds and no brace is open
/// (parentheses are ignored, so one unclosed `(` costs one stage only).
fn split_braces(
    src: &str,
    toks: &[Tok],
    lo: usize,
    hi: usize,
    starts: impl Fn(usize) -> bool,
) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut depth = 0usize;
    let mut cur = lo;
    for (i, t) in toks.iter().enumerate().take(hi).skip(lo) {
        if i > cur && depth == 0 && starts(i) {
            pieces.push(Piece { lo: cur, hi: i });
            cur = i;
        }
        match t.text(src) {
            "{" => depth += 1,
            "}" => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if cur < hi {
        pieces.push(Piece { lo: cur, hi });
    }
    pieces
}

fn piece_span(toks: &[Tok], p: Piece) -> Span {
    Span::new(toks[p.lo].start, toks[p.hi - 1].end)
}

/// Parses every top-level item, collecting syntax errors.
pub(super) fn parse_items(src: &str, errors: &mut Vec<Diagnostic>) -> Vec<Item> {
    let toks = scan(src);
    let is_top = |i: usize| {
        let t = toks[i];
        let option = toks.get(i + 1).is_some_and(|n| n.text(src) == "=");
        t.kind == TokKind::Word && t.line_start && !option && TOP_KEYWORDS.contains(&t.text(src))
    };
    let pieces = split(
        &toks,
        0,
        toks.len(),
        |i, depth| depth == 0 && is_top(i),
        true,
    );
    let mut items = Vec::new();
    for p in pieces {
        let span = piece_span(&toks, p);
        let first = toks[p.lo].text(src);
        if !TOP_KEYWORDS.contains(&first) {
            errors.push(
                Diagnostic::new(
                    Code::Syntax,
                    format!("expected a declaration, found `{}`", errors::short(first)),
                )
                .with_label(Span::new(toks[p.lo].start, toks[p.lo].end), "not a declaration")
                .with_help(
                    "a recipe is made of `recipe`, `use`, `param`, `model`, `dataset`, `criterion`, `schedule`, `constraints` and `pipeline` blocks",
                ),
            );
            continue;
        }
        if first == "pipeline" {
            if let Some(pl) = parse_pipeline(src, &toks, p, errors) {
                items.push(Item::Pipeline(pl));
            }
            continue;
        }
        match RecipeParser::parse(Rule::item_alone, &src[span.start..span.end]) {
            Ok(mut pairs) => {
                let item = pairs.next().unwrap().into_inner().next().unwrap();
                items.push(build_item(item, span.start));
            }
            Err(e) => errors.push(errors::syntax_error(e, src, span, "a declaration")),
        }
    }
    items
}

/// Parses `pipeline { ... }` stage by stage.
fn parse_pipeline(
    src: &str,
    toks: &[Tok],
    p: Piece,
    errors: &mut Vec<Diagnostic>,
) -> Option<Pipeline> {
    let span = piece_span(toks, p);
    let open = p.lo + 1;
    if open >= p.hi || toks[open].text(src) != "{" {
        // Let the grammar describe what is wrong.
        if let Err(e) = RecipeParser::parse(Rule::item_alone, &src[span.start..span.end]) {
            errors.push(errors::syntax_error(e, src, span, "the pipeline"));
        }
        return None;
    }
    // Find the brace that closes the pipeline.
    let mut depth = 0usize;
    let mut close = None;
    for (i, t) in toks.iter().enumerate().take(p.hi).skip(open) {
        // Only braces count: an unclosed `(` in a stage must not swallow
        // the pipeline's closing brace.
        match t.text(src) {
            "{" => depth += 1,
            "}" => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    close = Some(i);
                    break;
                }
            }
            _ => {}
        }
    }
    let body_hi = close.unwrap_or(p.hi);
    if close.is_none() {
        errors.push(
            Diagnostic::new(Code::Syntax, "this pipeline is never closed: expected `}`")
                .with_label(
                    Span::new(toks[open].start, toks[open].end),
                    "the pipeline opens here",
                )
                .with_label(Span::new(span.end, span.end), "expected `}` by here")
                .with_help("every `{` needs a matching `}`"),
        );
    } else if let Some(c) = close {
        if c + 1 < p.hi {
            let extra = toks[c + 1];
            errors.push(
                Diagnostic::new(
                    Code::Syntax,
                    format!(
                        "unexpected `{}` after the end of the pipeline",
                        errors::short(extra.text(src))
                    ),
                )
                .with_label(Span::new(extra.start, extra.end), "not part of any stage")
                .with_help("stages go inside the pipeline's braces"),
            );
        }
    }
    let is_stage = |i: usize| {
        let t = toks[i];
        let after_during = i > 0 && toks[i - 1].text(src) == "during";
        // `calibrate = data` on its own line is an option, not a stage.
        let option = toks.get(i + 1).is_some_and(|n| n.text(src) == "=");
        t.kind == TokKind::Word
            && t.line_start
            && !after_during
            && !option
            && STAGE_KEYWORDS.contains(&t.text(src))
    };
    let mut stages = Vec::new();
    for s in split_braces(src, toks, open + 1, body_hi, is_stage) {
        let sspan = piece_span(toks, s);
        let first = toks[s.lo];
        if !STAGE_KEYWORDS.contains(&first.text(src)) {
            errors.push(
                Diagnostic::new(
                    Code::Syntax,
                    format!("expected a stage, found `{}`", errors::short(first.text(src))),
                )
                .with_label(Span::new(first.start, first.end), "not a stage")
                .with_help(
                    "a pipeline holds stages: `train`, `finetune`, `calibrate`, `prune`, `evaluate`, `assert`, `export`, `report`, `analyze`",
                ),
            );
            continue;
        }
        match RecipeParser::parse(Rule::stage_alone, &src[sspan.start..sspan.end]) {
            Ok(mut pairs) => {
                let stage = pairs.next().unwrap().into_inner().next().unwrap();
                stages.push(build_stage(stage, sspan.start));
            }
            Err(e) => errors.push(errors::syntax_error(e, src, sspan, "a stage")),
        }
    }
    Some(Pipeline { stages, span })
}

/// The spans of every `#` comment (outside strings), in order.
pub(super) fn comment_spans(src: &str) -> Vec<Span> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'#' => {
                let start = i;
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                out.push(Span::new(start, i));
            }
            _ => i += 1,
        }
    }
    out
}
