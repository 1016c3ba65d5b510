use super::*;
use rand::SeedableRng;

fn model(mapping: Mapping, filtering: Filtering, allocation: Allocation) -> NatModel {
    NatModel {
        mapping,
        filtering,
        allocation,
        timeout: Duration::from_secs(30),
        hairpin: false,
    }
}

fn a(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn setup(m: NatModel) -> (Nat, StdRng, Instant) {
    let mut rng = StdRng::seed_from_u64(1);
    let mut nat = Nat::new(m, Ipv4Addr::new(198, 51, 100, 1), &mut rng);
    nat.add_host(a("10.0.0.2:1").ip());
    (nat, rng, Instant::now())
}

#[test]
fn eim_keeps_one_port_and_filters_by_address_and_port() {
    use Filtering::*;
    let (mut nat, mut rng, t) = setup(model(
        Mapping::EndpointIndependent,
        AddressAndPortDependent,
        Allocation::Preserve,
    ));
    let inside = a("10.0.0.2:40000");
    let x = nat
        .outbound(inside, a("192.0.2.1:1000"), t, &mut rng)
        .unwrap();
    let y = nat
        .outbound(inside, a("192.0.2.2:2000"), t, &mut rng)
        .unwrap();
    assert_eq!(x, y);
    assert_eq!(x.port(), 40000);
    assert_eq!(nat.inbound(a("192.0.2.1:1000"), 40000, t), Some(inside));
    assert_eq!(nat.inbound(a("192.0.2.1:1001"), 40000, t), None);
    assert_eq!(nat.stats.created, 1);
}

#[test]
fn address_dependent_filter_takes_any_port_of_a_contacted_ip() {
    let (mut nat, mut rng, t) = setup(model(
        Mapping::EndpointIndependent,
        Filtering::AddressDependent,
        Allocation::Preserve,
    ));
    let inside = a("10.0.0.2:40000");
    nat.outbound(inside, a("192.0.2.1:1000"), t, &mut rng)
        .unwrap();
    assert_eq!(nat.inbound(a("192.0.2.1:9"), 40000, t), Some(inside));
    assert_eq!(nat.inbound(a("192.0.2.3:1000"), 40000, t), None);
}

#[test]
fn symmetric_maps_per_destination_and_mappings_expire() {
    let (mut nat, mut rng, t) = setup(model(
        Mapping::AddressAndPortDependent,
        Filtering::AddressAndPortDependent,
        Allocation::Random,
    ));
    let inside = a("10.0.0.2:40000");
    let x = nat
        .outbound(inside, a("192.0.2.1:1000"), t, &mut rng)
        .unwrap();
    let y = nat
        .outbound(inside, a("192.0.2.1:1001"), t, &mut rng)
        .unwrap();
    assert_ne!(x, y);
    assert_eq!(nat.live_mappings(t), 2);
    let later = t + Duration::from_secs(31);
    assert_eq!(nat.inbound(a("192.0.2.1:1000"), x.port(), later), None);
    assert_eq!(nat.live_mappings(later), 0);
    assert_eq!(nat.stats.peak, 2);
}

#[test]
fn sequential_allocator_steps_by_its_stride() {
    let (mut nat, mut rng, t) = setup(model(
        Mapping::AddressAndPortDependent,
        Filtering::AddressAndPortDependent,
        Allocation::Sequential { stride: 3 },
    ));
    let inside = a("10.0.0.2:40000");
    let ports: Vec<u16> = (0..4)
        .map(|k| {
            nat.outbound(
                inside,
                SocketAddr::new(a("192.0.2.1:1").ip(), 1000 + k),
                t,
                &mut rng,
            )
            .unwrap()
            .port()
        })
        .collect();
    for w in ports.windows(2) {
        assert_eq!(next_port(w[0], 3), w[1]);
    }
}

#[test]
fn a_block_runs_out_per_destination_and_reuses_ports_across_them() {
    let (mut nat, mut rng, t) = setup(model(
        Mapping::AddressAndPortDependent,
        Filtering::AddressAndPortDependent,
        Allocation::BlockInOrder { size: 64 },
    ));
    let dst = a("192.0.2.1:1000");
    let mut ports = Vec::new();
    for k in 0..64u16 {
        let inside = SocketAddr::new(a("10.0.0.2:1").ip(), 30000 + k);
        ports.push(nat.outbound(inside, dst, t, &mut rng).unwrap().port());
    }
    // In order through the host's block.
    assert_eq!(ports, (20480..20544).collect::<Vec<u16>>());
    // A 65th flow to the same destination finds no port ...
    assert_eq!(nat.outbound(a("10.0.0.2:9"), dst, t, &mut rng), None);
    assert_eq!(nat.stats.exhausted, 1);
    // ... but one to another destination may reuse one.
    assert!(nat
        .outbound(a("10.0.0.2:9"), a("192.0.2.1:1001"), t, &mut rng)
        .is_some());
}

#[test]
fn a_dynamic_block_doubles_when_spent() {
    let (mut nat, mut rng, t) = setup(model(
        Mapping::AddressAndPortDependent,
        Filtering::AddressAndPortDependent,
        Allocation::DynamicBlock { min: 64, max: 256 },
    ));
    let dst = a("192.0.2.1:1000");
    let mut n = 0;
    for k in 0..300u16 {
        let inside = SocketAddr::new(a("10.0.0.2:1").ip(), 30000 + k);
        if nat.outbound(inside, dst, t, &mut rng).is_some() {
            n += 1;
        }
    }
    assert_eq!(n, 256);
    assert_eq!(nat.stats.exhausted, 44);
}
