//! The NAT matrix as a regression guard: every ordered pair of models
//! (controlling side down the rows), 20 seeds, 20 ms a link, 1 % loss,
//! each cell's direct count against the table below. Runs are seeded, so
//! the counts only move when the strategies (or the model) change; the
//! band of [`TOLERANCE`] lets harmless changes (another draw order of the
//! RNG) pass and catches a strategy that stops working in a cell.
//!
//! The cells at 0 are the pairs no strategy can punch (a NAT that draws
//! from the whole range at random, against one that maps per destination
//! too); an improvement there shows up here (raise the number).
//!
//! `cargo test -p punch-sim --test matrix -- --nocapture` prints the table.

use punch_sim::matrix::{details, table};
use punch_sim::{matrix, models};
use std::time::{Duration, Instant};

const SEEDS: u32 = 20;
/// How far a cell may stray from its expected count.
const TOLERANCE: u32 = 2;

/// Expected direct runs out of [`SEEDS`], in the order of `models()`:
/// full-cone, restricted, port-restricted, symmetric, cloudnat,
/// cloudnat-inorder, cloudnat-eim, seq-1, seq-4, cloudnat-dpa.
#[rustfmt::skip]
const EXPECTED: [[u32; 10]; 10] = [
    //  full restr p-res  sym  cnat c-ord c-eim seq1 seq4 c-dpa
    [    20,  20,  20,  20,  20,  20,  20,  20,  20,  20], // full-cone
    [    20,  20,  20,  20,  20,  20,  20,  20,  20,  20], // restricted
    // symmetric-like peers: the birthday method (port-restricted sprays).
    [    20,  20,  20,  20,  20,  20,  20,  20,  20,  20], // port-restricted
    // sym <-> any endpoint-dependent peer: random over the whole range on
    // one side leaves nothing to scan or predict (relayed, by design).
    [    20,  20,  20,   0,   0,   0,  20,   0,   0,   0], // symmetric
    // Both sides map per destination: the block scan (block <-> block),
    // port prediction (a counting side advertises its counter,
    // punch_protocol::predict: counter <-> counter, counter <-> block).
    // 200 seeds: 197..200 of 200 in every such cell.
    [    20,  20,  20,   0,  20,  20,  20,  20,  20,  20], // cloudnat
    [    20,  20,  20,   0,  20,  20,  20,  20,  20,  20], // cloudnat-inorder
    // cloudnat-eim -> seq-4 lost one run to the hard side going quiet once
    // it validated, until its met sockets kept answering (HARD_ANSWER_GRACE).
    [    20,  20,  20,  20,  20,  20,  20,  20,  20,  20], // cloudnat-eim
    [    20,  20,  20,   0,  20,  20,  20,  20,  20,  20], // seq-1
    [    20,  20,  20,   0,  20,  20,  20,  20,  20,  20], // seq-4
    [    20,  20,  20,   0,  20,  20,  20,  20,  20,  20], // cloudnat-dpa
];

/// A NAT that gives each host a few ports (a 64-port block) or counts
/// (which a few mappings cannot tell from an in-order block).
fn small_pool(m: &punch_sim::Model) -> bool {
    use punch_sim::Allocation::*;
    matches!(
        m.nat.allocation,
        BlockRandom { .. } | BlockInOrder { .. } | DynamicBlock { .. } | Sequential { .. }
    )
}

#[test]
fn matrix_direct_counts_hold() {
    let models = models();
    assert_eq!(
        models.len(),
        EXPECTED.len(),
        "a model was added: extend EXPECTED"
    );
    let t = Instant::now();
    let cells = matrix(&models, SEEDS, Duration::from_millis(20), 0.01);
    println!("{}", table(&models, &cells));
    println!("{}", details(&cells));
    println!("{} runs in {:.1?}", cells.len() as u32 * SEEDS, t.elapsed());
    let mut wrong = Vec::new();
    for (i, a) in models.iter().enumerate() {
        for (j, b) in models.iter().enumerate() {
            let got = cells
                .iter()
                .find(|c| c.a == a.name && c.b == b.name)
                .map_or(0, |c| c.direct);
            let want = EXPECTED[i][j];
            if got.abs_diff(want) > TOLERANCE {
                wrong.push(format!(
                    "{} -> {}: {got}/{SEEDS} direct, expected {want}",
                    a.name, b.name
                ));
            }
        }
    }
    // The port budget: behind a NAT that gives the host 64 ports (a block,
    // or a counter that may be an in-order block), no run makes more than
    // 4 mappings toward one remote (ten punches in a row toward one peer fit
    // in the block: allocator::budget_of), and none runs out of ports.
    for a in &models {
        for b in &models {
            let Some(c) = cells.iter().find(|c| c.a == a.name && c.b == b.name) else {
                continue;
            };
            for (side, m) in [(0, a), (1, b)] {
                if small_pool(m) && c.max_per_remote[side] > 4 {
                    wrong.push(format!(
                        "{} -> {}: {} mappings toward one remote behind {} (budget 4)",
                        a.name, b.name, c.max_per_remote[side], m.name
                    ));
                }
            }
            if c.exhausted_runs > 0 && (small_pool(a) || small_pool(b)) {
                wrong.push(format!(
                    "{} -> {}: {} runs ran a NAT out of ports",
                    a.name, b.name, c.exhausted_runs
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "cells off their expected direct count:\n{}",
        wrong.join("\n")
    );
}
