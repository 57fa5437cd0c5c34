//! Coverage-free fuzzing on the stable toolchain (test builds only): inputs a decoder must
//! survive, as arbitrary bytes or as valid seeds with a few bytes overwritten, so the
//! generator reaches past the first checks of a format.

use proptest::prelude::*;

/// Arbitrary bytes (up to 512), or one of `seeds` with up to 8 bytes overwritten.
pub(crate) fn bytes(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let mutated = (
        0..seeds.len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
    )
        .prop_map(move |(seed, edits)| {
            let mut bytes = seeds[seed].clone();
            for (at, b) in edits {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            bytes
        });
    prop_oneof![prop::collection::vec(any::<u8>(), 0..512), mutated]
}
