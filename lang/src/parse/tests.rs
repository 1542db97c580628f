//! Parser unit tests: one `parse` helper, inputs inline.

use super::*;

fn parse(src: &str) -> Parsed {
    source_to_ast(src)
}

fn messages(src: &str) -> Vec<String> {
    parse(src)
        .errors
        .iter()
        .map(|d| format!("{}: {}", d.code, d.message))
        .collect()
}

#[test]
fn parses_the_language_sample() {
    let src = r#"recipe lenet300_magnitude { version = 1, seed = 7 }
use std.{wanda, sparsegpt}
param target = 92%
model   net   = mlp(inputs = 784, hidden = [300, 100], classes = 10, act = relu)
dataset train = mnist("data/mnist", split = "train", batch = 128, shuffle = true)
criterion mag = abs(w) * sqrt(abs(w * grad(w)) + 1e-8)
schedule agp = gradual(from = 0%, to = 90%, start = step 0, end = step 2000, every = 100 steps, curve = cubic)
constraints guard {
  targets  = ["*.weight"]
  scope    = global
  keep_min = 2% per layer        # guard
}
pipeline {
  train    net on train (epochs = 10, optimizer = sgd(lr = 0.05, momentum = 0.9))
  prune    net by mag to target (schedule = iterative(rounds = 4), constraints = guard) {
    each round: finetune net on train (epochs = 2)
  }
  evaluate net on test -> [accuracy, sparsity, pqi] as dense
  assert   accuracy >= 97.5% and perplexity <= 1.5 * dense.perplexity
  prune net by wanda (pattern = 2:4) during
    train net on train (epochs = 8)
  report pqi, accuracy per round -> "out/sap.svg"
  export   net to "out/lenet300.safetensors"
}
"#;
    let p = parse(src);
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert_eq!(p.recipe.items.len(), 9);
    let pl = p.recipe.pipelines().next().unwrap();
    assert_eq!(pl.stages.len(), 7);
    let prune = &pl.stages[1];
    assert_eq!(prune.kind, StageKind::Prune);
    assert!(prune.to.is_some() && prune.args.is_some());
    assert_eq!(
        prune.block.as_ref().unwrap().each.as_ref().unwrap().name,
        "round"
    );
    assert!(pl.stages[4].during.is_some());
}

#[test]
fn precedence_and_associativity() {
    let e = source_to_expr("1 + 2 * 3 ^ 2 ^ 2 - 4 >= 5 and not x or y").unwrap();
    // ((((1 + (2 * (3 ^ (2 ^ 2)))) - 4) >= 5) and (not x)) or y
    let ExprKind::Binary {
        op: BinaryOp::Or,
        lhs,
        ..
    } = &e.kind
    else {
        panic!("{e:?}")
    };
    let ExprKind::Binary {
        op: BinaryOp::And,
        lhs,
        rhs,
    } = &lhs.kind
    else {
        panic!()
    };
    assert!(matches!(
        rhs.kind,
        ExprKind::Unary {
            op: UnaryOp::Not,
            ..
        }
    ));
    let ExprKind::Binary {
        op: BinaryOp::Ge,
        lhs,
        ..
    } = &lhs.kind
    else {
        panic!()
    };
    let ExprKind::Binary {
        op: BinaryOp::Sub,
        lhs,
        ..
    } = &lhs.kind
    else {
        panic!()
    };
    let ExprKind::Binary {
        op: BinaryOp::Add,
        rhs,
        ..
    } = &lhs.kind
    else {
        panic!()
    };
    let ExprKind::Binary {
        op: BinaryOp::Mul,
        rhs,
        ..
    } = &rhs.kind
    else {
        panic!()
    };
    let ExprKind::Binary {
        op: BinaryOp::Pow,
        rhs,
        ..
    } = &rhs.kind
    else {
        panic!()
    };
    assert!(matches!(
        rhs.kind,
        ExprKind::Binary {
            op: BinaryOp::Pow,
            ..
        }
    ));
}

#[test]
fn literals() {
    let cases = [
        ("92%", "Percent"),
        ("2:4", "Pattern"),
        ("100 steps", "Duration"),
        ("step 0", "Duration"),
        ("1e-3", "Number"),
        ("\"a\\\"b\"", "Str"),
        ("true", "Bool"),
        ("[1, 2,]", "List"),
        ("f(1, x = 2)", "Call"),
        ("dense.perplexity", "Member"),
        ("2% per layer", "Per"),
        ("(x)", "Paren"),
    ];
    for (src, kind) in cases {
        let e = source_to_expr(src).unwrap_or_else(|d| panic!("{src}: {d:?}"));
        assert!(
            format!("{:?}", e.kind).starts_with(kind),
            "{src} → {:?}",
            e.kind
        );
    }
    let ExprKind::Percent { value, .. } = source_to_expr("92.5%").unwrap().kind else {
        panic!()
    };
    assert!((value - 0.925).abs() < 1e-12);
}

#[test]
fn reports_every_error_in_one_run() {
    let src = "recipe r { version = 1 }\nmodel net = mlp(inputs = )\ndataset d = mnist(\"x\")\ncriterion c = abs(w) +\npipeline {\n  train net on d (epochs = 1)\n  prune net by by\n  evaluate net on d -> [accuracy]\n  export net to \n}\n";
    let m = messages(src);
    assert_eq!(m.len(), 4, "{m:#?}");
    assert!(m.iter().all(|s| s.starts_with("P002")));
    // The good stages survive.
    let p = parse(src);
    assert_eq!(p.recipe.pipelines().next().unwrap().stages.len(), 2);
}

#[test]
fn errors_speak_the_users_words() {
    for src in [
        "param x 5",
        "model = mlp()",
        "pipeline { train net on }",
        "recipe r { version = }",
        "pipeline { frobnicate net }",
        "use",
    ] {
        for d in parse(src).errors {
            let m = d.message.to_lowercase();
            for bad in [
                "rule",
                "expr_",
                "ident",
                "eoi",
                "kw_",
                "postfixed",
                "primary",
            ] {
                assert!(!m.contains(bad), "{src}: {m}");
            }
        }
    }
    assert_eq!(messages("param x 5"), ["P002: expected `=`, found `5`"]);
}

#[test]
fn hostile_input_is_a_clean_error() {
    let deep = format!("param x = {}1{}", "(".repeat(10_000), ")".repeat(10_000));
    assert_eq!(parse(&deep).errors[0].code, Code::TooDeep);
    let neg = format!("param x = {}1", "- ".repeat(10_000));
    assert_eq!(parse(&neg).errors[0].code, Code::TooDeep);
    assert_eq!(parse("").errors[0].code, Code::Empty);
    assert_eq!(parse("  # only a comment\n").errors[0].code, Code::Empty);
    assert_eq!(
        bytes_to_source(b"recipe \xff").unwrap_err().code,
        Code::NotUtf8
    );
    let big = "# x\n".repeat(MAX_SOURCE_BYTES / 4 + 1);
    assert_eq!(parse(&big).errors[0].code, Code::TooLarge);
    let unclosed = "pipeline {\n train net on d\n";
    assert!(messages(unclosed)[0].contains("never closed"));
}
