//! The weighted round-robin slot layout of a service (pure, no I/O).
//!
//! The kernel picks a backend with `slots[service, generation, counter % slot_count]`, so the
//! weights live entirely in the order of the slots. The order comes from nginx's smooth weighted
//! round-robin: a backend with weight `w` out of `total` holds exactly `w` of every `total`
//! consecutive slots, and heavy backends are spread out instead of clumped, so a burst of
//! connections is shared the same way as a long run.

/// Greatest common divisor; `gcd(0, x) == x`, so zero weights do not affect the reduction.
fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Weights divided by their gcd (2:4:6 becomes 1:2:3): the shortest sequence with the same
/// proportions, so the slots map stays small. All-zero (or empty) input stays all zero.
fn reduce(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd);
    if g == 0 {
        return weights.to_vec();
    }
    weights.iter().map(|w| w / g).collect()
}

// The capacity rule validation uses; the tests check `layout` agrees with it.
#[cfg(test)]
use mesh_common::capacity::slot_count;

/// The backend index (into `weights`) of each slot, in slot order.
///
/// Each step adds every backend's weight to its running `current`, picks the largest `current`
/// (lowest index on ties, so the result is deterministic) and subtracts the total from it: nginx's
/// smooth weighted round-robin. Two restrictions on the pick keep its good spread and make it
/// exact:
/// - only backends with slots left are candidates, so each gets exactly its reduced weight;
/// - the previous pick is skipped while another backend has slots left, unless it holds more
///   than half of the slots (then some repeats cannot be avoided). Plain nginx order can repeat
///   a backend: 5:3:2 gives `0 1 2 0 0 1 0 2 1 0`; this gives `0 1 2 0 1 0 2 0 1 0`.
///
/// Backends with weight 0 get no slot. Empty (or all-zero) input gives an empty layout.
pub fn layout(weights: &[u32]) -> Vec<usize> {
    let reduced = reduce(weights);
    let total: i64 = reduced.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; reduced.len()];
    let mut remaining = reduced.clone();
    let mut slots: Vec<usize> = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, &w) in current.iter_mut().zip(&reduced) {
            *c += i64::from(w);
        }
        let avoid = slots.last().copied().filter(|&p| {
            2 * i64::from(reduced[p]) <= total
                && remaining.iter().enumerate().any(|(i, &r)| i != p && r > 0)
        });
        let mut pick: Option<usize> = None;
        for (i, &r) in remaining.iter().enumerate() {
            if r == 0 || Some(i) == avoid {
                continue;
            }
            // Strictly greater keeps the lowest index on ties.
            if pick.is_none_or(|p| current[i] > current[p]) {
                pick = Some(i);
            }
        }
        // Slots left to fill means some backend has slots left, so there is always a pick.
        let Some(p) = pick else { break };
        current[p] -= total;
        remaining[p] -= 1;
        slots.push(p);
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::{MAX_BACKENDS_PER_SERVICE, MAX_SLOTS_PER_SERVICE, MAX_WEIGHT};

    /// How many slots each backend holds.
    fn counts(slots: &[usize], n: usize) -> Vec<u32> {
        let mut c = vec![0u32; n];
        for &s in slots {
            c[s] += 1;
        }
        c
    }

    /// Tiny deterministic LCG (Knuth's MMIX constants), so the tests need no crate and always
    /// check the same vectors.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) as u32
        }
        fn below(&mut self, n: u32) -> u32 {
            self.next() % n
        }
    }

    /// Every property a layout must have.
    fn check_layout(weights: &[u32]) {
        let slots = layout(weights);
        let reduced = reduce(weights);
        let total: u32 = reduced.iter().sum();
        assert_eq!(slots.len() as u32, total, "{weights:?}: length");
        assert_eq!(slot_count(weights), total, "{weights:?}: slot_count");
        // Each backend holds exactly its reduced weight: the whole sequence is one window, and
        // the kernel cycles over it, so every window of `total` consecutive slots (wrapping
        // around) is a rotation of it and holds the same counts.
        assert_eq!(
            counts(&slots, weights.len()),
            reduced,
            "{weights:?}: counts"
        );
        let t = total as usize;
        for start in 0..t {
            let window: Vec<usize> = (0..t).map(|k| slots[(start + k) % t]).collect();
            assert_eq!(
                counts(&window, weights.len()),
                reduced,
                "{weights:?}: window {start}"
            );
        }
        // Interleaved, not clumped: a backend with at most half of the slots never takes two
        // adjacent ones.
        for (i, &w) in reduced.iter().enumerate() {
            if w > 0 && 2 * w <= total {
                for pair in slots.windows(2) {
                    assert!(
                        !(pair[0] == i && pair[1] == i),
                        "{weights:?}: backend {i} (weight {w} of {total}) is in adjacent slots: {slots:?}"
                    );
                }
            }
        }
        // Smooth: after any prefix of k slots, each backend has its fair share k*w/total within
        // two slots either way (measured: at most about 1.1 for plain nginx order and for this
        // one; a clumped order is off by up to w).
        let mut seen = vec![0i64; weights.len()];
        for (k, &s) in slots.iter().enumerate() {
            seen[s] += 1;
            let k = k as i64 + 1;
            for (i, &w) in reduced.iter().enumerate() {
                let diff = seen[i] * i64::from(total) - k * i64::from(w);
                assert!(
                    diff.abs() <= 2 * i64::from(total),
                    "{weights:?}: backend {i} is {diff}/{total} slots off its share after {k}: {slots:?}"
                );
            }
        }
    }

    #[test]
    fn empty_input_gives_no_slots() {
        assert_eq!(layout(&[]), Vec::<usize>::new());
        assert_eq!(slot_count(&[]), 0);
    }

    #[test]
    fn all_zero_weights_give_no_slots() {
        assert_eq!(layout(&[0, 0]), Vec::<usize>::new());
        assert_eq!(slot_count(&[0, 0]), 0);
    }

    #[test]
    fn zero_weight_backend_gets_no_slot() {
        assert_eq!(layout(&[0, 1, 1]), vec![1, 2]);
        check_layout(&[0, 2, 0, 4]);
    }

    #[test]
    fn equal_weights_rotate_in_index_order() {
        assert_eq!(layout(&[1, 1, 1]), vec![0, 1, 2]);
        check_layout(&[1, 1, 1]);
    }

    #[test]
    fn weights_1_2_3_are_interleaved() {
        // The classic nginx sequence, with the lowest index winning ties.
        assert_eq!(layout(&[1, 2, 3]), vec![2, 1, 0, 2, 1, 2]);
        check_layout(&[1, 2, 3]);
    }

    #[test]
    fn repeats_of_plain_nginx_order_are_avoided() {
        // Plain nginx order is 0 1 2 0 0 1 0 2 1 0: backend 0 twice in a row with half the slots.
        assert_eq!(layout(&[5, 3, 2]), vec![0, 1, 2, 0, 1, 0, 2, 0, 1, 0]);
    }

    #[test]
    fn weights_are_reduced_by_their_gcd() {
        assert_eq!(layout(&[2, 4, 6]), layout(&[1, 2, 3]));
        assert_eq!(slot_count(&[2, 4, 6]), 6);
        assert_eq!(layout(&[1000, 1000]), vec![0, 1]);
        assert_eq!(slot_count(&[1000, 500, 250]), 7);
    }

    #[test]
    fn single_backend_gets_one_slot_whatever_its_weight() {
        assert_eq!(layout(&[1]), vec![0]);
        assert_eq!(layout(&[MAX_WEIGHT]), vec![0]);
        assert_eq!(slot_count(&[7]), 1);
    }

    #[test]
    fn big_coprime_weights_use_every_slot() {
        let slots = layout(&[1000, 999]);
        assert_eq!(slots.len(), 1999);
        assert_eq!(counts(&slots, 2), vec![1000, 999]);
        // Nearly equal weights alternate strictly: the heavier one takes both ends.
        let alternating: Vec<usize> = (0..1999).map(|k| k % 2).collect();
        assert_eq!(slots, alternating);
        check_layout(&[1000, 999]);
    }

    #[test]
    fn one_heavy_backend_is_spread_over_light_ones() {
        // 3:1:1:1 must not start with the heavy backend three times in a row.
        let slots = layout(&[3, 1, 1, 1]);
        assert_eq!(slots, vec![0, 1, 0, 2, 3, 0]);
        check_layout(&[3, 1, 1, 1]);
    }

    #[test]
    fn largest_valid_layout_is_exact() {
        // The largest service validation accepts: MAX_BACKENDS_PER_SERVICE backends whose
        // weights (gcd 1) need exactly MAX_SLOTS_PER_SERVICE slots.
        let n = MAX_BACKENDS_PER_SERVICE as usize;
        let mut weights = vec![16u32; n - 2];
        weights.extend([31, 1]);
        assert_eq!(slot_count(&weights), MAX_SLOTS_PER_SERVICE);
        let slots = layout(&weights);
        assert_eq!(slots.len() as u32, MAX_SLOTS_PER_SERVICE);
        assert_eq!(counts(&slots, n), weights);
        assert!(slots.windows(2).all(|p| p[0] != p[1]));
    }

    #[test]
    fn slot_count_of_the_largest_service_fits_in_u32() {
        let weights = vec![MAX_WEIGHT; MAX_BACKENDS_PER_SERVICE as usize];
        assert_eq!(slot_count(&weights), MAX_BACKENDS_PER_SERVICE);
        let mut weights = weights;
        weights[0] = MAX_WEIGHT - 1;
        assert_eq!(
            slot_count(&weights),
            MAX_WEIGHT * MAX_BACKENDS_PER_SERVICE - 1
        );
    }

    #[test]
    fn exhaustive_small_weight_vectors_keep_every_property() {
        // Every vector of 1..=4 backends with weights 0..=6.
        for n in 1..=4u32 {
            for code in 0..7u32.pow(n) {
                let weights: Vec<u32> = (0..n).map(|i| code / 7u32.pow(i) % 7).collect();
                check_layout(&weights);
            }
        }
    }

    #[test]
    fn random_weight_vectors_keep_every_property() {
        let mut rng = Lcg(0x5eed);
        for _ in 0..500 {
            let n = 1 + rng.below(12) as usize;
            let max = [3, 10, 50][rng.below(3) as usize];
            let weights: Vec<u32> = (0..n).map(|_| 1 + rng.below(max)).collect();
            check_layout(&weights);
        }
    }

    #[test]
    fn random_vectors_with_a_common_factor_match_the_reduced_layout() {
        let mut rng = Lcg(42);
        for _ in 0..200 {
            let n = 1 + rng.below(8) as usize;
            let weights: Vec<u32> = (0..n).map(|_| 1 + rng.below(20)).collect();
            let factor = 2 + rng.below(40);
            let scaled: Vec<u32> = weights.iter().map(|w| w * factor).collect();
            assert_eq!(layout(&scaled), layout(&weights), "{weights:?} x {factor}");
        }
    }
}
