//! The standard library, written in `.prune` (`stdlib/*.prune`) and embedded.

use crate::ast::{DeclKind, Expr, Item};
use std::sync::OnceLock;

/// The source of `stdlib/criteria.prune`.
pub const CRITERIA_SOURCE: &str = include_str!("../../stdlib/criteria.prune");

/// The standard criteria by name, parsed once.
fn criteria() -> &'static Vec<(String, Expr)> {
    static CRITERIA: OnceLock<Vec<(String, Expr)>> = OnceLock::new();
    CRITERIA.get_or_init(|| {
        let parsed = crate::parse::source_to_ast(CRITERIA_SOURCE);
        assert!(
            parsed.errors.is_empty(),
            "stdlib/criteria.prune does not parse: {:?}",
            parsed.errors
        );
        parsed
            .recipe
            .items
            .into_iter()
            .filter_map(|i| match i {
                Item::Decl(d) if d.kind == DeclKind::Criterion => Some((d.name.name, d.value)),
                _ => None,
            })
            .collect()
    })
}

/// The definition of a standard criterion (spans point into [`CRITERIA_SOURCE`]).
pub fn criterion(name: &str) -> Option<&'static Expr> {
    criteria().iter().find(|(n, _)| n == name).map(|(_, e)| e)
}

/// The names of the standard criteria, in file order.
pub fn criterion_names() -> impl Iterator<Item = &'static str> {
    criteria().iter().map(|(n, _)| n.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtins::{self, Kind};

    #[test]
    fn every_std_criterion_is_defined_in_prune_and_in_the_table() {
        let defined: Vec<&str> = criterion_names().collect();
        let table: Vec<&str> = builtins::of_kind(Kind::Criterion)
            .filter(|b| b.stdlib)
            .map(|b| b.name)
            .collect();
        assert_eq!(defined, table);
    }

    #[test]
    fn the_table_says_what_each_std_criterion_reads() {
        for name in criterion_names() {
            let needs = crate::check::library_needs(CRITERIA_SOURCE, name)
                .expect("stdlib criterion checks");
            assert_eq!(needs, builtins::lookup(name).unwrap().needs, "{name}");
        }
    }
}
