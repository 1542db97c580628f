//! Checker unit tests: one `check` helper returning `CODE: message` lines.

use crate::{ast_to_checked, source_to_ast, Override};

fn check_with(src: &str, overrides: &[&str]) -> Vec<String> {
    let parsed = source_to_ast(src);
    assert!(parsed.errors.is_empty(), "syntax: {:?}", parsed.errors);
    let overrides: Vec<Override> = overrides.iter().map(|o| o.parse().unwrap()).collect();
    match ast_to_checked(&parsed.recipe, src, &overrides) {
        Ok(_) => vec![],
        Err(d) => d
            .iter()
            .map(|d| format!("{}: {}", d.code, d.message))
            .collect(),
    }
}

fn check(src: &str) -> Vec<String> {
    check_with(src, &[])
}

const BASE: &str = r#"recipe t { version = 1, seed = 1 }
use std.{magnitude, wanda, taylor}
param target = 90%
model net = mlp(inputs = 784, hidden = [300, 100], classes = 10)
dataset train = mnist("data/mnist", split = "train", batch = 128)
dataset test = mnist("data/mnist", split = "test")
"#;

fn with_pipeline(stages: &str) -> String {
    format!("{BASE}pipeline {{\n{stages}\n}}\n")
}

#[test]
fn every_example_checks() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "prune") {
            let src = std::fs::read_to_string(&path).unwrap();
            assert_eq!(check(&src), Vec::<String>::new(), "{}", path.display());
            n += 1;
        }
    }
    assert!(n >= 8);
}

#[test]
fn a_clean_recipe_checks() {
    assert_eq!(check(&with_pipeline("train net on train (epochs = 1)\nprune net by magnitude to target\nevaluate net on test -> [accuracy]\nassert accuracy >= 90%")), Vec::<String>::new());
}

#[test]
fn undefined_names_suggest_close_ones() {
    let m = check(&with_pipeline("train nte on train (epochs = 1)"));
    assert_eq!(m, ["P010: undefined model `nte`"]);
}

#[test]
fn ranges_and_types() {
    assert_eq!(
        check(&with_pipeline("prune net by magnitude to 100%")),
        ["P024: 1 (100%) is out of range"]
    );
    assert_eq!(
        check(&with_pipeline("train net on train (epochs = 0)")),
        ["P024: 0 is out of range"]
    );
    assert_eq!(
        check(&with_pipeline("prune net by magnitude (pattern = 4:4)")),
        ["P030: `4:4` is not a valid N:M pattern"]
    );
    assert_eq!(
        check(&with_pipeline("train net on train (epochs = 1.5)")),
        ["P023: expected an integer, found `1.5`"]
    );
    assert_eq!(
        check(&with_pipeline("evaluate net on test -> [acuracy]")),
        ["P042: unknown metric `acuracy`"]
    );
}

#[test]
fn data_needs() {
    let m = check(&with_pipeline("prune net by taylor to 50%"));
    assert_eq!(
        m,
        ["P040: this criterion reads gradients, but the stage is given no data"]
    );
    assert!(check(&with_pipeline("prune net by taylor to 50% on train")).is_empty());
    let m = check(&with_pipeline("prune net by wanda to 50%"));
    assert_eq!(m, ["P040: this criterion reads activation statistics, but the stage is given no calibration data"]);
    assert!(check(&with_pipeline(
        "prune net by wanda to 50% (calibrate = train)"
    ))
    .is_empty());
}

#[test]
fn asserts_need_earlier_evaluations() {
    let m = check(&with_pipeline(
        "assert accuracy >= 90%\nevaluate net on test -> [accuracy]",
    ));
    assert_eq!(
        m,
        ["P041: `accuracy` is asserted but no earlier stage evaluates it"]
    );
    let m = check(&with_pipeline(
        "evaluate net on test -> [accuracy] as dense\nassert accuracy >= dense.loss",
    ));
    assert_eq!(m, ["P041: the evaluation `dense` does not measure `loss`"]);
}

#[test]
fn overrides_are_type_checked() {
    let src = with_pipeline("prune net by magnitude to target");
    assert!(check_with(&src, &["target=0.95"]).is_empty());
    assert!(check_with(&src, &["target=95%"]).is_empty());
    assert_eq!(
        check_with(&src, &["target=1.5"]),
        ["P024: 1.5 (150%) is out of range"]
    );
    assert_eq!(
        check_with(&src, &["target=\"x\""]),
        ["P050: `--set target=\"x\"`: expected a fraction (`90%` or `0.9`), found a string"]
    );
    assert_eq!(
        check_with(&src, &["tagret=0.5"]),
        ["P050: `--set tagret`: the recipe has no param `tagret`"]
    );
    // The value is quoted from the override, not from the recipe.
    let src =
        format!("{BASE}param epochs = 3\npipeline {{\ntrain net on train (epochs = epochs)\n}}\n");
    assert_eq!(
        check_with(&src, &["epochs=1.5"]),
        ["P050: `--set epochs=1.5`: expected an integer, found `1.5`"]
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let m = check(&with_pipeline("train nte on train (epochs = 0)\nprune net by magnitud to 2\nevaluate net on tset -> [accuracy]"));
    assert_eq!(m.len(), 5, "{m:#?}");
}
