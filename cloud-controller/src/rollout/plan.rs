//! The arithmetic of a staged rollout (docs/design/rollouts.md), as pure functions: how many
//! devices a step covers, the order devices are taken in, when a wave's failures halt the
//! rollout, what puts a device's desired values back, whether a device still holds the
//! rollout's values, and whether two rollouts' documents meet.
//!
//! No I/O and no clock: the reconcile loop reads the Devices and the time, and asks these.

use edgesync_protocol::merge::merge_object;
use serde_json::{Map, Value};

use crate::shard::fnv1a;

/// A number of devices, or a share of some total (`5`, `"10%"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// That many devices.
    Devices(u64),
    /// That share, in percent (0 to 100).
    Percent(u8),
}

impl Count {
    /// Reads `N` or `"P%"` (P from 0 to 100).
    ///
    /// # Errors
    /// A sentence saying what is accepted.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let wrong = || format!("{text:?} is neither a number of devices (5) nor a share (\"10%\")");
        match text.strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= 100 => Ok(Self::Percent(p)),
                _ => Err(wrong()),
            },
            None => text.parse().map(Self::Devices).map_err(|_| wrong()),
        }
    }

    /// How many of `total` it is: a share rounds up (so "1%" of a small fleet is still one
    /// device, and a step never covers none when it asks for some); never more than `total`.
    pub fn of(self, total: u64) -> u64 {
        match self {
            Self::Devices(n) => n.min(total),
            Self::Percent(p) => (total * u64::from(p)).div_ceil(100),
        }
    }
}

/// The order devices are taken in: by a hash of the rollout's uid and the device's name.
/// Stable across restarts and leaders (the hash is FNV-1a, not the process's random
/// hasher), different for every rollout, and spread over the fleet, so a canary is a sample
/// rather than the first names in the alphabet.
pub fn order<'a>(rollout_uid: &str, names: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut keyed: Vec<(u64, &str)> = names
        .into_iter()
        .map(|n| (fnv1a(&[rollout_uid.as_bytes(), b"/", n.as_bytes()]), n))
        .collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, n)| n).collect()
}

/// Whether `failed` devices of a wave of `wave` devices break the rollout: more than
/// `max_failures` allows (a share of the wave rounds down, so "5%" of a 10-device canary
/// tolerates none). `max_failures` is how many may fail; 0 halts at the first failure.
pub fn breached(failed: u64, wave: u64, max_failures: Count) -> bool {
    let allowed = match max_failures {
        Count::Devices(n) => n,
        Count::Percent(p) => wave * u64::from(p) / 100,
    };
    failed > allowed
}

/// The merge patch that puts back what `patch` changes in `desired` (taken before the patch
/// is applied): each key the patch sets gets its previous value, or `null` where it was
/// absent. Objects the patch merges into are walked; a value the patch replaces (a scalar, an
/// array, or an object over a non-object) is put back whole.
pub fn revert_patch(
    desired: &Map<String, Value>,
    patch: &Map<String, Value>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in patch {
        let before = desired.get(key);
        let undo = match (value, before) {
            (Value::Object(inner), Some(Value::Object(was))) => {
                Value::Object(revert_patch(was, inner))
            }
            (_, Some(was)) => was.clone(),
            (_, None) => Value::Null,
        };
        out.insert(key.clone(), undo);
    }
    out
}

/// Whether `desired` still holds what `patch` sets: applying the patch again changes nothing.
/// A device someone edited after the rollout touched it is not reverted over that edit.
pub fn holds(desired: &Map<String, Value>, patch: &Map<String, Value>) -> bool {
    let mut again = desired.clone();
    !merge_object(&mut again, patch)
}

/// Whether two merge patches set a value in common: a key both set, where not both values
/// are objects (objects are walked). Two rollouts whose documents meet on one device would
/// interleave, so the second waits.
pub fn overlaps(a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
    a.iter().any(|(key, va)| match (va, b.get(key)) {
        (_, None) => false,
        (Value::Object(ia), Some(Value::Object(ib))) => overlaps(ia, ib),
        _ => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgesync_protocol::merge::merge_patch;
    use proptest::prelude::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn counts_and_shares_of_a_fleet() {
        assert_eq!(Count::parse("5"), Ok(Count::Devices(5)));
        assert_eq!(Count::parse("10%"), Ok(Count::Percent(10)));
        assert_eq!(Count::parse(" 100% "), Ok(Count::Percent(100)));
        for bad in ["101%", "-1", "x", "%", "1.5", ""] {
            assert!(Count::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Count::Devices(5).of(3), 3);
        assert_eq!(Count::Percent(1).of(200), 2);
        assert_eq!(Count::Percent(1).of(10), 1, "a share rounds up");
        assert_eq!(Count::Percent(10).of(10_000), 1_000);
        assert_eq!(Count::Percent(100).of(7), 7);
        assert_eq!(Count::Percent(0).of(7), 0);
    }

    #[test]
    fn failures_allowed_per_wave() {
        assert!(!breached(0, 10, Count::Devices(0)));
        assert!(breached(1, 10, Count::Devices(0)));
        assert!(!breached(2, 10, Count::Devices(2)));
        assert!(breached(3, 10, Count::Devices(2)));
        // 5% of 10 is 0.5: none tolerated; 5% of 100 is 5.
        assert!(breached(1, 10, Count::Percent(5)));
        assert!(!breached(5, 100, Count::Percent(5)));
        assert!(breached(6, 100, Count::Percent(5)));
    }

    #[test]
    fn the_order_is_stable_and_differs_between_rollouts() {
        let names: Vec<String> = (0..200).map(|i| format!("press-{i}")).collect();
        let a = order("uid-a", names.iter().map(String::as_str));
        let again = order("uid-a", names.iter().rev().map(String::as_str));
        assert_eq!(a, again, "the input order does not matter");
        let b = order("uid-b", names.iter().map(String::as_str));
        assert_ne!(a, b);
        assert_eq!(a.len(), 200);
        // Not the alphabetical order: the first ten are spread over the names.
        let mut first: Vec<&str> = a[..10].to_vec();
        first.sort_unstable();
        assert_ne!(
            first,
            names[..10].iter().map(String::as_str).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_revert_puts_back_each_value_the_patch_set() {
        let desired =
            obj(json!({"speed": 1000, "motor": {"mode": "auto", "max": 3}, "old": 5, "list": [1]}));
        let patch = obj(
            json!({"speed": 1500, "motor": {"max": 4, "new": true}, "old": null, "added": {"a": 1}, "list": [2]}),
        );
        let revert = revert_patch(&desired, &patch);
        assert_eq!(
            Value::Object(revert.clone()),
            json!({"speed": 1000, "motor": {"max": 3, "new": null}, "old": 5, "added": null, "list": [1]})
        );
        let mut d = Value::Object(desired.clone());
        merge_patch(&mut d, &Value::Object(patch.clone()));
        assert!(holds(d.as_object().unwrap(), &patch));
        merge_patch(&mut d, &Value::Object(revert));
        assert_eq!(d, Value::Object(desired.clone()));
        assert!(!holds(&desired, &patch));
    }

    #[test]
    fn documents_meet_where_they_set_the_same_value() {
        let a = obj(json!({"speed": 1, "motor": {"max": 3}}));
        assert!(overlaps(&a, &obj(json!({"speed": 2}))));
        assert!(overlaps(&a, &obj(json!({"motor": {"max": null}}))));
        assert!(
            overlaps(&a, &obj(json!({"motor": 7}))),
            "one replaces what the other merges into"
        );
        assert!(!overlaps(
            &a,
            &obj(json!({"motor": {"min": 1}, "mode": "x"}))
        ));
        assert!(!overlaps(&a, &Map::new()));
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<i8>().prop_map(|n| json!(n)),
            "[a-c]{0,2}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop::collection::btree_map("[a-d]", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
        })
    }

    fn object() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::btree_map("[a-d]", json_value(), 0..4).prop_map(|m| {
            // A stored desired document holds no nulls (the API server keeps them, the agent
            // drops them): strip them as a Device's desired state is read.
            let mut v = Value::Object(m.into_iter().collect());
            edgesync_protocol::merge::strip_nulls(&mut v);
            v.as_object().cloned().unwrap_or_default()
        })
    }

    proptest! {
        /// Any desired document, any rollout document: the patch then its revert gives back
        /// the document exactly, and the patched document holds the patch.
        #[test]
        fn a_revert_undoes_any_patch(desired in object(), patch in prop::collection::btree_map("[a-d]", json_value(), 0..4)) {
            let patch: Map<String, Value> = patch.into_iter().collect();
            let revert = revert_patch(&desired, &patch);
            let mut d = Value::Object(desired.clone());
            merge_patch(&mut d, &Value::Object(patch.clone()));
            prop_assert!(holds(d.as_object().unwrap(), &patch));
            merge_patch(&mut d, &Value::Object(revert));
            prop_assert_eq!(d, Value::Object(desired));
        }
    }
}
