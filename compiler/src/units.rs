//! Which layers a `unit = ...` prune stage removes units from, and how many
//! each keeps: one rule that `check` (on the declared widths) and the
//! executor (on the model as it is) share.

use prunec_lang::resolved::Unit;
use prunec_runtime::model::{NoUnits, UnitKind, UnitLayer};
use prunec_runtime::Architecture;

use crate::lower::glob_match;

/// Why a stage's targets do not name layers with units of its kind.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitTargetError {
    pub message: String,
    pub help: String,
}

/// The runtime's kind of classifier unit for a recipe's `unit = ...`
/// (none for the units of language models).
pub fn kind(unit: Unit) -> Option<UnitKind> {
    match unit {
        Unit::Neuron => Some(UnitKind::Neuron),
        Unit::Channel => Some(UnitKind::Channel),
        Unit::Ffn | Unit::KvGroup => None,
    }
}

/// The layers whose units the stage removes, in forward order. Written
/// targets must each name weights of layers with units of this kind; the
/// default (`*.weight`) takes every such layer (the output layer, whose
/// units are the classes, never is one).
pub fn unit_targets(
    arch: &Architecture,
    targets: Option<&[String]>,
    skip: &[String],
    unit: Unit,
) -> Result<Vec<UnitLayer>, UnitTargetError> {
    let Some(want) = kind(unit) else {
        return Err(UnitTargetError {
            message: format!("`{unit}` units belong to language models"),
            help: "a classifier removes `neuron` or `channel` units".into(),
        });
    };
    let layers = arch.unit_layers();
    let skipped = |n: &str| skip.iter().any(|k| glob_match(k, n));
    let Some(targets) = targets else {
        let picked: Vec<UnitLayer> = layers
            .into_iter()
            .filter(|u| u.kind == want && !skipped(&u.weight()))
            .collect();
        if picked.is_empty() {
            return Err(UnitTargetError {
                message: format!("no layer of this model has {unit}s to remove"),
                help: match unit {
                    Unit::Ffn | Unit::KvGroup => String::new(),
                    Unit::Neuron => "`neuron` units are the outputs of linear layers (not the last one); use `unit = channel` for convolutions".into(),
                    Unit::Channel => "`channel` units are the output channels of convolutions; use `unit = neuron` for linear layers".into(),
                },
            });
        }
        return Ok(picked);
    };
    let mut names: Vec<String> = arch
        .param_shapes()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| targets.iter().any(|t| glob_match(t, n)) && !skipped(n))
        .collect();
    if let Some(b) = names.iter().find(|n| n.ends_with(".bias")) {
        return Err(UnitTargetError {
            message: format!("the targets select `{b}`: with `unit`, targets name weights and each bias goes with its unit"),
            help: "target the layers' weights (`[\"fc1.weight\"]`, `[\"conv*.weight\"]`)".into(),
        });
    }
    names.retain(|n| n.ends_with(".weight"));
    let mut picked = Vec::new();
    for n in &names {
        match arch.why_no_units(n) {
            None => {
                let u = layers
                    .iter()
                    .find(|u| u.weight() == *n)
                    .expect("a layer with units is listed");
                if u.kind != want {
                    return Err(UnitTargetError {
                        message: format!(
                            "`{n}` has {}s, not {unit}s",
                            u.kind.word()
                        ),
                        help: format!(
                            "write `unit = {}` in a stage of its own for it, or leave it out of `targets`",
                            u.kind.word()
                        ),
                    });
                }
                picked.push(u.clone());
            }
            Some(NoUnits::Output) => {
                return Err(UnitTargetError {
                    message: format!("`{n}` is the output layer: its units are the classes"),
                    help: "leave the output layer out of `targets`".into(),
                })
            }
            Some(NoUnits::Graph | NoUnits::Unknown) => {
                return Err(UnitTargetError {
                    message: format!("`{n}` is not the weight of a layer with units"),
                    help: "target the weights of linear or conv layers".into(),
                })
            }
        }
    }
    if picked.is_empty() {
        return Err(UnitTargetError {
            message: format!("the targets {targets:?} (minus skip {skip:?}) name no layer"),
            help: "target the layers' weights (`[\"fc1.weight\"]`)".into(),
        });
    }
    Ok(picked)
}

/// Units a layer of `units` keeps at `sparsity` when layers are pruned
/// each by itself: the removed count rounds down, and one unit always stays.
pub fn kept_per_layer(units: usize, sparsity: f64) -> usize {
    let removed = (units as f64 * sparsity + 1e-9).floor() as usize;
    units.saturating_sub(removed).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_targets_take_every_layer_of_the_kind_but_the_output() {
        let arch = Architecture::lenet5();
        let names = |u: Unit| -> Vec<String> {
            unit_targets(&arch, None, &[], u)
                .unwrap()
                .into_iter()
                .map(|l| l.layer)
                .collect()
        };
        assert_eq!(names(Unit::Channel), ["conv1", "conv2"]);
        assert_eq!(names(Unit::Neuron), ["fc1", "fc2"]);
        let mlp = Architecture::lenet_300_100();
        assert!(unit_targets(&mlp, None, &[], Unit::Channel).is_err());
        let skip = ["fc2.weight".to_string()];
        assert_eq!(
            unit_targets(&mlp, None, &skip, Unit::Neuron).unwrap().len(),
            1
        );
    }

    #[test]
    fn written_targets_must_name_layers_with_units_of_the_kind() {
        let arch = Architecture::lenet5();
        let t = |v: &[&str], u| {
            let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
            unit_targets(&arch, Some(&v), &[], u)
        };
        assert_eq!(t(&["fc1.weight"], Unit::Neuron).unwrap().len(), 1);
        assert!(t(&["fc3.weight"], Unit::Neuron)
            .unwrap_err()
            .message
            .contains("output layer"));
        assert!(t(&["conv1.weight"], Unit::Neuron)
            .unwrap_err()
            .message
            .contains("channels"));
        assert!(t(&["*"], Unit::Neuron)
            .unwrap_err()
            .message
            .contains("bias"));
        assert!(t(&["nothing*"], Unit::Neuron).is_err());
    }

    #[test]
    fn per_layer_counts_round_the_removed_units_down_and_keep_one() {
        assert_eq!(kept_per_layer(6, 0.5), 3);
        assert_eq!(kept_per_layer(16, 0.5), 8);
        assert_eq!(kept_per_layer(120, 0.3), 84);
        assert_eq!(kept_per_layer(7, 0.5), 4);
        assert_eq!(kept_per_layer(3, 1.0), 1);
        assert_eq!(kept_per_layer(10, 0.0), 10);
    }
}
