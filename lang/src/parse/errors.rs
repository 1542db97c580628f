//! Turns pest errors into diagnostics that speak the user's language, never rule names.

use super::Rule;
use crate::ast::Span;
use crate::diag::{Code, Diagnostic};
use pest::error::{ErrorVariant, InputLocation};
use std::collections::BTreeSet;

/// What the user is told a rule stands for; `None` hides the rule.
fn describe(rule: Rule) -> Option<&'static str> {
    Some(match rule {
        Rule::expr | Rule::postfixed | Rule::subject | Rule::paren | Rule::expr_alone => {
            "an expression"
        }
        Rule::ident | Rule::name | Rule::callee | Rule::arg_name => "a name",
        Rule::stage | Rule::stage_kw | Rule::stage_alone => "a stage",
        Rule::kw_recipe | Rule::header => "`recipe`",
        Rule::decl_kw | Rule::decl | Rule::item_alone | Rule::kw_top => "a declaration",
        Rule::field | Rule::fields => "a `name = value` field",
        Rule::args => "`(`",
        Rule::arg => "an argument",
        Rule::number | Rule::digits => "a number",
        Rule::string | Rule::string_inner => "a string",
        Rule::percent => "a percentage",
        Rule::pattern => "an N:M pattern",
        Rule::duration | Rule::unit => "a duration",
        Rule::list => "a list",
        Rule::boolean => "`true` or `false`",
        Rule::infix => "an operator",
        Rule::prefix => "`-` or `not`",
        Rule::on_clause | Rule::kw_on => "`on`",
        Rule::by_clause | Rule::kw_by => "`by`",
        Rule::to_clause | Rule::kw_to => "`to`",
        Rule::out_clause => "`->`",
        Rule::as_clause | Rule::kw_as => "`as`",
        Rule::during_clause | Rule::kw_during => "`during`",
        Rule::block => "`{`",
        Rule::each_label | Rule::kw_each => "`each`",
        Rule::member => "`.`",
        Rule::per_unit | Rule::kw_per => "`per`",
        Rule::use_path => "a module path such as `std.wanda`",
        Rule::use_set => "`{`",
        Rule::pipeline | Rule::kw_pipeline => "`pipeline`",
        Rule::constraints_decl | Rule::kw_constraints => "`constraints`",
        Rule::use_decl | Rule::kw_use => "`use`",
        Rule::param_decl | Rule::kw_param => "`param`",
        Rule::EOI => "the end",
        _ => return None,
    })
}

/// Rules that stand for one thing the user could type next.
fn is_leaf(rule: Rule) -> bool {
    matches!(
        rule,
        Rule::expr
            | Rule::postfixed
            | Rule::ident
            | Rule::callee
            | Rule::arg_name
            | Rule::name
            | Rule::number
            | Rule::percent
            | Rule::pattern
            | Rule::duration
            | Rule::string
            | Rule::boolean
            | Rule::stage_kw
            | Rule::decl_kw
            | Rule::kw_recipe
            | Rule::kw_use
            | Rule::kw_param
            | Rule::kw_constraints
            | Rule::kw_pipeline
            | Rule::kw_top
            | Rule::kw_on
            | Rule::kw_by
            | Rule::kw_to
            | Rule::kw_as
            | Rule::kw_during
            | Rule::kw_each
            | Rule::kw_per
            | Rule::infix
            | Rule::prefix
            | Rule::EOI
    )
}

/// Kinds of expected things that are implied by "an expression".
const EXPRESSION_PARTS: [&str; 14] = [
    "`\"`",
    "`-`",
    "`not`",
    "a name",
    "a number",
    "a string",
    "a percentage",
    "an N:M pattern",
    "a duration",
    "a list",
    "`true` or `false`",
    "`-` or `not`",
    "`(`",
    "`[`",
];

/// Things that may continue an expression or a stage; mentioned only when
/// nothing else was expected.
const CONTINUATIONS: [&str; 11] = [
    "an operator",
    "`.`",
    "`per`",
    "`on`",
    "`by`",
    "`to`",
    "`->`",
    "`as`",
    "`during`",
    "`(`",
    "`{`",
];

/// Shortens a found token for messages.
pub(super) fn short(s: &str) -> String {
    let first_line = s.lines().next().unwrap_or("");
    let mut out: String = first_line.chars().take(24).collect();
    if out.len() < first_line.len() {
        out.push('…');
    }
    out
}

/// The token found at `pos` (a word, a string, or one character).
fn found_at(src: &str, pos: usize) -> (String, Span) {
    let skipped = src[pos.min(src.len())..].len() - src[pos.min(src.len())..].trim_start().len();
    let pos = pos.min(src.len()) + skipped;
    let rest = &src[pos..];
    let Some(c) = rest.chars().next() else {
        return (
            "the end of the file".to_string(),
            Span::new(src.len(), src.len()),
        );
    };
    let len = if c.is_alphanumeric() || c == '_' {
        rest.find(|ch: char| !(ch.is_alphanumeric() || ch == '_' || ch == '.'))
            .unwrap_or(rest.len())
    } else if c == '"' {
        rest[1..]
            .find(['"', '\n'])
            .map(|i| i + 2)
            .unwrap_or(rest.len())
    } else {
        c.len_utf8()
    };
    let text = &rest[..len];
    (format!("`{}`", short(text)), Span::new(pos, pos + len))
}

fn join_or(items: &[String]) -> String {
    match items.len() {
        0 => String::new(),
        1 => items[0].clone(),
        n => format!("{} or {}", items[..n - 1].join(", "), items[n - 1]),
    }
}

/// Converts a pest error on `src[base..]` into a diagnostic; `what` names the
/// construct being parsed ("a declaration", "a stage").
pub(super) fn syntax_error(
    err: pest::error::Error<Rule>,
    src: &str,
    chunk: Span,
    what: &str,
) -> Diagnostic {
    let base = chunk.start;
    let mut pos = match err.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    } + base;
    let mut expected: BTreeSet<&'static str> = BTreeSet::new();
    let mut literals: BTreeSet<String> = BTreeSet::new();
    let ErrorVariant::ParsingError { positives, .. } = &err.variant else {
        // pest's own limits (call or stack depth).
        return Diagnostic::new(Code::TooDeep, "this is nested too deeply to be parsed")
            .with_label(Span::new(pos, pos), "here")
            .with_help("simplify the expression or split it into named parts");
    };
    match err.parse_attempts() {
        Some(attempts) if !attempts.call_stacks().is_empty() => {
            // The furthest position any rule or token was tried at.
            pos = attempts.max_position + base;
            for stack in attempts.call_stacks() {
                // A container rule as the deepest attempt means one of its
                // literal tokens failed; those are listed below.
                let rule = stack.deepest.get_rule().copied().filter(|r| is_leaf(*r));
                if let Some(d) = rule.and_then(describe) {
                    expected.insert(d);
                }
            }
            for t in attempts.expected_tokens() {
                // Punctuation only: words are described through their rules.
                let t = t.to_string();
                let t = t.trim();
                let punct = !t.is_empty()
                    && !matches!(t, "_" | "#" | "\\")
                    && !t.contains("..")
                    && !t.chars().any(|c| c.is_alphanumeric());
                if punct {
                    literals.insert(format!("`{t}`"));
                }
            }
        }
        _ => expected.extend(positives.iter().filter_map(|r| describe(*r))),
    }
    // Continuations of a number (`1.5`, `10%`, `2:4`) are noise here.
    literals.retain(|l| !matches!(l.as_str(), "`%`" | "`:`" | "`.`" | "`_`"));
    let mut all: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    for l in literals {
        if !all.contains(&l) {
            all.push(l);
        }
    }
    if all.iter().any(|s| s == "an expression") {
        all.retain(|s| !EXPRESSION_PARTS.contains(&s.as_str()));
    }
    let (found, found_span) = if pos >= chunk.end {
        let end = if chunk.end >= src.len() {
            "the end of the file".to_string()
        } else {
            format!("the end of {what}")
        };
        (end, Span::new(chunk.end, chunk.end))
    } else {
        found_at(src, pos)
    };
    // Operators are one thing to the reader.
    let operators = [
        "`!=`", "`*`", "`+`", "`-`", "`/`", "`<=`", "`<`", "`==`", "`>=`", "`>`", "`^`",
    ];
    if all
        .iter()
        .filter(|s| operators.contains(&s.as_str()))
        .count()
        > 2
    {
        all.retain(|s| !operators.contains(&s.as_str()));
        all.push("an operator".to_string());
    }
    let mut seen = BTreeSet::new();
    all.retain(|s| seen.insert(s.clone()));
    let only_continuations = all
        .iter()
        .all(|s| CONTINUATIONS.contains(&s.as_str()) || s == "the end");
    let message = if all.is_empty() || only_continuations {
        format!("unexpected {found} after the end of {what}")
    } else {
        let mut main: Vec<String> = all
            .iter()
            .filter(|s| !CONTINUATIONS.contains(&s.as_str()) && *s != "the end")
            .cloned()
            .collect();
        if main.is_empty() {
            main = all.iter().filter(|s| *s != "the end").cloned().collect();
        }
        main.sort_by_key(|s| (!s.starts_with('`'), s.clone()));
        format!("expected {}, found {found}", join_or(&main))
    };
    let stage_word = [
        "`train`",
        "`finetune`",
        "`calibrate`",
        "`prune`",
        "`evaluate`",
        "`assert`",
        "`export`",
        "`report`",
        "`analyze`",
    ];
    let help =
        if only_continuations && stage_word.contains(&found.as_str()) && what == "a declaration" {
            Some("stages go inside `pipeline { ... }`".to_string())
        } else if found == "the end of the file" {
            Some(
                "the file ends in the middle of this; is a closing bracket or a value missing?"
                    .to_string(),
            )
        } else if found == "`=`" && all.iter().any(|s| s == "`->`" || s == "`(`") {
            Some("stage options go in parentheses: `train net on data (epochs = 3)`".to_string())
        } else if found.starts_with("`\"") && !found.ends_with("\"`") && !found.ends_with("\"…`")
        {
            Some("this string is not closed on its line".to_string())
        } else {
            None
        };
    Diagnostic::new(Code::Syntax, message)
        .with_label(found_span, format!("in {what}: unexpected here"))
        .with_help_opt(help)
}
