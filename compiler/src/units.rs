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
        Unit::Ffn | Unit::KvGroup | Unit::Head | Unit::Expert | Unit::ExpertNeuron => None,
    }
}

/// The layers whose units the stage removes, in forward order. A target
/// written out by name must be the weight of a layer with units of this
/// kind; a glob (and the default `*.weight`) takes the matching layers that
/// have them (the output layer, whose units are the classes, never has).
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
                    Unit::Ffn
                    | Unit::KvGroup
                    | Unit::Head
                    | Unit::Expert
                    | Unit::ExpertNeuron => String::new(),
                    Unit::Neuron => "`neuron` units are the outputs of linear layers (not the last one); use `unit = channel` for convolutions".into(),
                    Unit::Channel => "`channel` units are the output channels of convolutions; use `unit = neuron` for linear layers".into(),
                },
            });
        }
        return Ok(picked);
    };
    // A name written out must be a layer with units of the kind; a glob
    // picks, among the names it matches, the weights of such layers.
    let mut picked: Vec<UnitLayer> = Vec::new();
    for (name, _) in arch.param_shapes() {
        if skipped(&name) {
            continue;
        }
        let exact = targets
            .iter()
            .any(|t| !t.contains('*') && glob_match(t, &name));
        let globbed = targets
            .iter()
            .any(|t| t.contains('*') && glob_match(t, &name));
        if !exact && !globbed {
            continue;
        }
        let unit_layer = layers.iter().find(|u| u.weight() == name);
        match unit_layer {
            Some(u) if u.kind == want => picked.push(u.clone()),
            _ if !exact => {}
            Some(u) => {
                return Err(UnitTargetError {
                    message: format!("`{name}` has {}s, not {unit}s", u.kind.word()),
                    help: format!(
                        "write `unit = {}` in a stage of its own for it, or leave it out of `targets`",
                        u.kind.word()
                    ),
                })
            }
            None if name.ends_with(".bias") => {
                return Err(UnitTargetError {
                    message: format!("the targets name `{name}`: with `unit`, targets name weights and each bias goes with its unit"),
                    help: "target the layers' weights (`[\"fc1.weight\"]`, `[\"conv*.weight\"]`)".into(),
                })
            }
            None => {
                let (message, help) = match arch.why_no_units(&name) {
                    Some(NoUnits::Output) => (
                        format!("`{name}` is the output layer: its units are the classes"),
                        "leave the output layer out of `targets`".to_string(),
                    ),
                    _ => (
                        format!("`{name}` is not the weight of a layer with units"),
                        "target the weights of linear or conv layers".to_string(),
                    ),
                };
                return Err(UnitTargetError { message, help });
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

/// What a language-model unit stage keeps in every block: the units
/// chosen among (`per_group`: a kv group's query heads for `head`, all of a
/// block's units otherwise), how many of each group, and the configuration
/// after it. `None` for classifier units, and for `head` where no key/value
/// head is shared (one query head per group: it cannot go alone).
pub fn llm_kept(
    c: &prunec_runtime::llm::LlamaConfig,
    unit: Unit,
    sparsity: f64,
) -> Option<(usize, usize, prunec_runtime::llm::LlamaConfig)> {
    let nkv = c.num_key_value_heads.max(1);
    let group = c.num_attention_heads / nkv;
    let (count, per_group) = match unit {
        Unit::Ffn => (c.intermediate_size, c.intermediate_size),
        Unit::KvGroup => (nkv, nkv),
        Unit::Head if group > 1 => (c.num_attention_heads, group),
        _ => return None,
    };
    let kept_in_group = kept_per_layer(per_group, sparsity);
    let kept = kept_in_group * (count / per_group.max(1));
    let mut after = c.clone();
    match unit {
        Unit::Ffn => after.intermediate_size = kept,
        Unit::KvGroup => {
            after.head_dim = Some(c.head_dim());
            after.num_key_value_heads = kept;
            after.num_attention_heads = kept * group;
        }
        _ => {
            after.head_dim = Some(c.head_dim());
            after.num_attention_heads = kept;
        }
    }
    Some((per_group, kept_in_group, after))
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
        assert!(t(&["fc1.bias"], Unit::Neuron)
            .unwrap_err()
            .message
            .contains("bias"));
        // Globs pick the layers with units of the kind.
        assert_eq!(t(&["*"], Unit::Neuron).unwrap().len(), 2);
        assert_eq!(t(&["*.weight"], Unit::Channel).unwrap().len(), 2);
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
