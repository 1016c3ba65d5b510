use super::*;
use crate::matrix::models;

fn model(name: &str) -> NatModel {
    models()
        .into_iter()
        .find(|m| m.name == name)
        .map(|m| m.nat)
        .expect("known model")
}

#[test]
fn a_run_is_deterministic() {
    let s = Scenario::new(model("cloudnat"), model("cloudnat"), 7);
    assert_eq!(run(&s), run(&s));
}

#[test]
fn easy_pair_goes_direct_in_about_a_round_trip() {
    let s = Scenario::new(model("full-cone"), model("port-restricted"), 1);
    let o = run(&s);
    assert!(o.direct, "{o:?}");
    // Offer to pong: one round trip across both links (80 ms) and change.
    let t = o.time_to_direct.expect("time");
    assert!(t < Duration::from_millis(300), "{t:?}");
}

#[test]
fn same_nat_goes_direct_over_the_lan() {
    let mut s = Scenario::new(model("symmetric"), model("symmetric"), 3);
    s.same_nat = true;
    let o = run(&s);
    assert!(o.direct, "{o:?}");
}

#[test]
fn a_black_hole_times_out_within_the_deadline() {
    let mut s = Scenario::new(model("port-restricted"), model("port-restricted"), 1);
    s.loss = 1.0;
    let o = run(&s);
    assert!(!o.validated && !o.direct);
    assert!(o.pings > 0);
}
