//! The host's rules, message by message.
use super::*;
use crate::sparkplug::proto::datatype as dt;
use serde_json::json;

const T0: u64 = 1_764_633_600_000;

fn metric(
    name: Option<&str>,
    alias: Option<u64>,
    datatype: Option<u32>,
    value: MetricValue,
) -> Metric {
    Metric {
        name: name.map(str::to_owned),
        alias,
        datatype,
        value: Some(value),
        ..Metric::default()
    }
}

fn payload(seq: Option<u64>, metrics: Vec<Metric>) -> Vec<u8> {
    Payload {
        timestamp: Some(T0),
        metrics,
        seq,
        ..Payload::default()
    }
    .encode_to_vec()
}

fn nbirth(bd: u64) -> Vec<u8> {
    payload(
        Some(0),
        vec![
            metric(
                Some(BD_SEQ),
                None,
                Some(dt::INT64),
                MetricValue::LongValue(bd),
            ),
            metric(
                Some(REBIRTH),
                Some(1),
                Some(dt::BOOLEAN),
                MetricValue::BooleanValue(false),
            ),
        ],
    )
}

fn dbirth(seq: u64) -> Vec<u8> {
    payload(
        Some(seq),
        vec![
            metric(
                Some("temperature"),
                Some(10),
                Some(dt::DOUBLE),
                MetricValue::DoubleValue(20.5),
            ),
            metric(
                Some("Inputs/count"),
                Some(11),
                Some(dt::INT64),
                MetricValue::LongValue(3),
            ),
            metric(
                Some("setpoint"),
                Some(12),
                Some(dt::FLOAT),
                MetricValue::FloatValue(1.5),
            ),
        ],
    )
}

fn ddata(seq: u64, alias: u64, v: f64) -> Vec<u8> {
    payload(
        Some(seq),
        vec![metric(None, Some(alias), None, MetricValue::DoubleValue(v))],
    )
}

fn handle(host: &mut Host, topic: &str, body: &[u8], now: u64) -> Result<Outcome, Refused> {
    host.handle(&topic::parse(topic).expect("a Sparkplug topic"), body, now)
}

fn born_host() -> Host {
    let mut host = Host::new(HostSettings::default());
    let out = handle(&mut host, "spBv1.0/Plant1/NBIRTH/GW1", &nbirth(7), T0).unwrap();
    assert_eq!(
        out,
        Outcome::default(),
        "a node with only control metrics is not a device"
    );
    let out = handle(
        &mut host,
        "spBv1.0/Plant1/DBIRTH/GW1/Press_1",
        &dbirth(1),
        T0,
    )
    .unwrap();
    assert_eq!(
        out.updates,
        vec![StateUpdate {
            device: "gw1.press-1".into(),
            reported: json!({"temperature": 20.5, "Inputs": {"count": 3}, "setpoint": 1.5})
                .as_object()
                .unwrap()
                .clone(),
            connected: true,
        }]
    );
    assert!(out.rebirth.is_none() && out.issues.is_empty(), "{out:?}");
    host
}

#[test]
fn births_declare_aliases_that_data_resolves() {
    let mut host = born_host();
    let out = handle(
        &mut host,
        "spBv1.0/Plant1/DDATA/GW1/Press_1",
        &ddata(2, 10, 21.0),
        T0,
    )
    .unwrap();
    assert_eq!(
        out.updates[0].reported,
        *json!({"temperature": 21.0}).as_object().unwrap()
    );
    assert!(out.rebirth.is_none() && out.issues.is_empty(), "{out:?}");
    // Names work too, with the datatype from the birth.
    let by_name = payload(
        Some(3),
        vec![metric(
            Some("Inputs/count"),
            None,
            None,
            MetricValue::LongValue(4),
        )],
    );
    let out = handle(&mut host, "spBv1.0/Plant1/DDATA/GW1/Press_1", &by_name, T0).unwrap();
    assert_eq!(
        out.updates[0].reported,
        *json!({"Inputs": {"count": 4}}).as_object().unwrap()
    );
}

#[test]
fn a_seq_gap_asks_for_one_rebirth_per_interval_and_keeps_the_values() {
    let mut host = born_host();
    let out = handle(
        &mut host,
        "spBv1.0/Plant1/DDATA/GW1/Press_1",
        &ddata(5, 10, 22.0),
        T0,
    )
    .unwrap();
    assert_eq!(
        out.issues,
        vec![Issue::SeqGap {
            expected: 2,
            got: 5
        }]
    );
    let rebirth = out.rebirth.expect("a rebirth request");
    assert_eq!(rebirth.topic, "spBv1.0/Plant1/NCMD/GW1");
    let cmd = Payload::decode(rebirth.payload.as_slice()).unwrap();
    assert_eq!(cmd.metrics[0].name.as_deref(), Some(REBIRTH));
    assert_eq!(cmd.metrics[0].value, Some(MetricValue::BooleanValue(true)));
    assert_eq!(out.updates[0].reported["temperature"], json!(22.0));
    // Another gap within the interval: no second request.
    let out = handle(
        &mut host,
        "spBv1.0/Plant1/DDATA/GW1/Press_1",
        &ddata(9, 10, 23.0),
        T0 + 1,
    )
    .unwrap();
    assert!(out.rebirth.is_none());
    let out = handle(
        &mut host,
        "spBv1.0/Plant1/DDATA/GW1/Press_1",
        &ddata(20, 10, 23.0),
        T0 + 5_000,
    )
    .unwrap();
    assert!(out.rebirth.is_some());
    // In order again: nothing to ask. seq wraps after 255.
    let out = handle(
        &mut host,
        "spBv1.0/Plant1/DDATA/GW1/Press_1",
        &ddata(21, 10, 23.0),
        T0 + 10_000,
    )
    .unwrap();
    assert!(out.rebirth.is_none() && out.issues.is_empty());
    for seq in (22..=255).chain(0..3) {
        let out = handle(
            &mut host,
            "spBv1.0/Plant1/DDATA/GW1/Press_1",
            &ddata(seq, 10, 1.0),
            T0 + 10_000,
        )
        .unwrap();
        assert!(out.issues.is_empty(), "seq {seq}: {out:?}");
    }
}

#[test]
fn data_from_a_node_never_born_is_not_guessed() {
    let mut host = Host::new(HostSettings::default());
    let out = handle(
        &mut host,
        "spBv1.0/Plant1/DDATA/GW1/Press_1",
        &ddata(4, 10, 22.0),
        T0,
    )
    .unwrap();
    assert!(out.issues.contains(&Issue::UnknownAlias(10)));
    assert!(out.issues.contains(&Issue::NotBorn));
    assert!(out.rebirth.is_some());
    assert!(
        out.updates[0].reported.is_empty(),
        "an unknown alias is left out"
    );
}

#[test]
fn deaths_mark_devices_offline_unless_stale() {
    let mut host = born_host();
    let ddeath = payload(Some(2), vec![]);
    let out = handle(&mut host, "spBv1.0/Plant1/DDEATH/GW1/Press_1", &ddeath, T0).unwrap();
    assert_eq!(
        out.updates,
        vec![StateUpdate {
            device: "gw1.press-1".into(),
            reported: Map::new(),
            connected: false
        }]
    );
    let death = |bd| {
        payload(
            None,
            vec![metric(
                Some(BD_SEQ),
                None,
                Some(dt::INT64),
                MetricValue::LongValue(bd),
            )],
        )
    };
    let out = handle(&mut host, "spBv1.0/Plant1/NDEATH/GW1", &death(6), T0).unwrap();
    assert_eq!(out.issues, vec![Issue::StaleDeath]);
    assert!(out.updates.is_empty());
    let out = handle(&mut host, "spBv1.0/Plant1/NDEATH/GW1", &death(7), T0).unwrap();
    assert_eq!(out.updates.len(), 1);
    assert!(!out.updates[0].connected);
    assert!(out.rebirth.is_none(), "a death asks for nothing");
}

#[test]
fn a_node_with_state_is_a_device_itself() {
    let mut host = Host::new(HostSettings::default());
    let birth = payload(
        Some(0),
        vec![
            metric(
                Some(BD_SEQ),
                None,
                Some(dt::INT64),
                MetricValue::LongValue(0),
            ),
            metric(
                Some("Properties/Hardware"),
                Some(1),
                Some(dt::STRING),
                MetricValue::StringValue("x86".into()),
            ),
        ],
    );
    let out = handle(&mut host, "spBv1.0/g/NBIRTH/gw", &birth, T0).unwrap();
    assert_eq!(out.updates[0].device, "gw");
    assert_eq!(
        out.updates[0].reported,
        *json!({"Properties": {"Hardware": "x86"}})
            .as_object()
            .unwrap()
    );
}

#[test]
fn ids_two_identities_share_are_refused() {
    let mut host = born_host();
    let err = handle(
        &mut host,
        "spBv1.0/Plant1/DBIRTH/gw1/press-1",
        &dbirth(1),
        T0,
    )
    .unwrap_err();
    assert!(matches!(err, Refused::IdConflict { .. }), "{err}");
    let err = handle(
        &mut host,
        "spBv1.0/Plant2/DBIRTH/GW1/Press_1",
        &dbirth(1),
        T0,
    )
    .unwrap_err();
    assert!(matches!(err, Refused::IdConflict { .. }), "{err}");
    let err = handle(
        &mut host,
        "spBv1.0/Plant1/DDATA/GW1/_",
        &ddata(2, 10, 1.0),
        T0,
    )
    .unwrap_err();
    assert!(matches!(err, Refused::InvalidId(_)), "{err}");
}

#[test]
fn garbage_and_limits_are_refused_and_change_nothing() {
    let mut host = born_host();
    let err = handle(
        &mut host,
        "spBv1.0/Plant1/DDATA/GW1/Press_1",
        b"\xff\xff\xff",
        T0,
    )
    .unwrap_err();
    assert_eq!(err.reason(), "sparkplug_decode");
    let mut small = Host::new(HostSettings {
        max_edge_nodes: 1,
        max_metrics_per_node: 8,
        ..HostSettings::default()
    });
    handle(&mut small, "spBv1.0/g/DBIRTH/a/d", &dbirth(1), T0).unwrap();
    let err = handle(&mut small, "spBv1.0/g/DBIRTH/b/d", &dbirth(1), T0).unwrap_err();
    assert_eq!(err, Refused::NodeLimit(1));
    let err = handle(&mut small, "spBv1.0/g/DBIRTH/a/e", &dbirth(2), T0).unwrap_err();
    assert_eq!(err, Refused::MetricLimit(8));
    // The refused birth taught nothing: device d's aliases still resolve.
    let out = handle(&mut small, "spBv1.0/g/DDATA/a/d", &ddata(3, 10, 5.0), T0).unwrap();
    assert_eq!(out.updates[0].reported["temperature"], json!(5.0));
}

#[test]
fn desired_changes_become_typed_commands() {
    let host = born_host();
    let mut skipped = Vec::new();
    let delta =
        json!({"setpoint": 2.25, "Inputs": {"count": 9}, "unknown": 1, "temperature": "hot"});
    let cmd = host
        .command("gw1.press-1", delta.as_object().unwrap(), T0, &mut skipped)
        .expect("a command");
    assert_eq!(cmd.topic, "spBv1.0/Plant1/DCMD/GW1/Press_1");
    let p = Payload::decode(cmd.payload.as_slice()).unwrap();
    let got: Vec<_> = p
        .metrics
        .iter()
        .map(|m| {
            (
                m.name.clone().unwrap(),
                m.datatype.unwrap(),
                m.value.clone().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "Inputs/count".to_owned(),
                dt::INT64,
                MetricValue::LongValue(9)
            ),
            (
                "setpoint".to_owned(),
                dt::FLOAT,
                MetricValue::FloatValue(2.25)
            ),
        ]
    );
    assert_eq!(
        skipped,
        vec!["temperature".to_owned(), "unknown".to_owned()]
    );
    assert!(
        host.command("plain-device", delta.as_object().unwrap(), T0, &mut skipped)
            .is_none()
    );
}

proptest::proptest! {
    #[test]
    fn any_bytes_on_any_topic_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256), kind in 0usize..6) {
        let topics = [
            "spBv1.0/g/NBIRTH/n", "spBv1.0/g/NDEATH/n", "spBv1.0/g/NDATA/n",
            "spBv1.0/g/DBIRTH/n/d", "spBv1.0/g/DDEATH/n/d", "spBv1.0/g/DDATA/n/d",
        ];
        let mut host = born_host();
        let _ = handle(&mut host, topics[kind], &body, T0);
    }
}

fn named_birth(seq: u64, names: &[String], first_alias: u64) -> Vec<u8> {
    let metrics = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            metric(
                Some(n),
                Some(first_alias + i as u64),
                Some(dt::DOUBLE),
                MetricValue::DoubleValue(1.0),
            )
        })
        .collect();
    payload(Some(seq), metrics)
}

#[test]
fn names_are_bounded_in_bytes_per_name_and_for_all_nodes() {
    let mut host = Host::new(HostSettings {
        max_name_bytes: 64 * 1024,
        ..HostSettings::default()
    });
    let long = vec!["x".repeat(MAX_METRIC_NAME_BYTES + 1)];
    let err = handle(
        &mut host,
        "spBv1.0/g/DBIRTH/a/d",
        &named_birth(0, &long, 1),
        T0,
    );
    assert_eq!(err, Err(Refused::NameBytes(MAX_METRIC_NAME_BYTES)));
    // 1,000-byte names: births from many nodes stop at the bytes bound, not before.
    let names: Vec<String> = (0..10).map(|i| format!("{i:0>1000}")).collect();
    let mut accepted = 0;
    for node in 0..100 {
        let topic = format!("spBv1.0/g/DBIRTH/n{node}/d");
        match handle(&mut host, &topic, &named_birth(0, &names, 1), T0) {
            Ok(_) => accepted += 1,
            Err(e) => {
                assert_eq!(e, Refused::NameBytes(64 * 1024));
                break;
            }
        }
    }
    assert!(
        (1..4).contains(&accepted),
        "{accepted} births of 20 KB names in 64 KiB"
    );
    assert!(host.bytes <= 64 * 1024);
}

#[test]
fn a_device_reborn_with_new_aliases_does_not_grow_the_node() {
    let mut host = Host::new(HostSettings {
        max_metrics_per_node: 100,
        ..HostSettings::default()
    });
    let names: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    for birth in 0..1_900u64 {
        let body = named_birth(birth % 256, &names, birth * 10);
        handle(&mut host, "spBv1.0/g/DBIRTH/a/d", &body, T0).unwrap();
    }
    let node = &host.nodes[&("g".to_owned(), "a".to_owned())];
    assert_eq!(node.aliases.len(), 10);
}

#[test]
fn devices_first_heard_in_data_are_bounded_like_births() {
    let mut host = Host::new(HostSettings {
        max_metrics_per_node: 100,
        ..HostSettings::default()
    });
    handle(&mut host, "spBv1.0/g/NBIRTH/a", &nbirth(1), T0).unwrap();
    let mut devices = 0;
    for i in 0..1_000u64 {
        let topic = format!("spBv1.0/g/DDATA/a/dev{i}");
        match handle(&mut host, &topic, &ddata((i + 1) % 256, 10, 1.0), T0) {
            Ok(out) => devices += out.updates.len(),
            Err(e) => {
                assert_eq!(e, Refused::MetricLimit(100));
                break;
            }
        }
    }
    assert!(
        devices < 100,
        "{devices} devices for a node limited to 100 entries"
    );
}

#[test]
fn a_birth_takes_the_place_of_a_node_never_born() {
    let mut host = Host::new(HostSettings {
        max_edge_nodes: 4,
        ..HostSettings::default()
    });
    for g in 0..4 {
        let topic = format!("spBv1.0/g{g}/NDATA/squatter");
        let _ = handle(&mut host, &topic, &ddata(1, 1, 1.0), T0);
    }
    assert_eq!(host.edge_nodes(), 4);
    let more = handle(
        &mut host,
        "spBv1.0/g9/NDATA/squatter",
        &ddata(1, 1, 1.0),
        T0,
    );
    assert_eq!(more, Err(Refused::NodeLimit(4)));
    handle(&mut host, "spBv1.0/plant/NBIRTH/real", &nbirth(1), T0).unwrap();
    assert_eq!(host.edge_nodes(), 4);
    // Born nodes are never displaced.
    let mut born = Host::new(HostSettings {
        max_edge_nodes: 1,
        ..HostSettings::default()
    });
    handle(&mut born, "spBv1.0/g/NBIRTH/a", &nbirth(1), T0).unwrap();
    let err = handle(&mut born, "spBv1.0/g/NBIRTH/b", &nbirth(1), T0);
    assert_eq!(err, Err(Refused::NodeLimit(1)));
}

#[test]
fn one_node_id_is_born_in_one_group_only() {
    let mut host = Host::new(HostSettings::default());
    handle(
        &mut host,
        "spBv1.0/g0/NBIRTH/u",
        &payload(Some(0), Vec::new()),
        T0,
    )
    .unwrap();
    for g in 1..50 {
        let topic = format!("spBv1.0/g{g}/NBIRTH/u");
        let err = handle(&mut host, &topic, &payload(Some(0), Vec::new()), T0).unwrap_err();
        assert_eq!(err.reason(), "sparkplug_id_conflict");
    }
    assert_eq!(host.edge_nodes(), 1);
}

#[test]
fn a_death_without_its_births_bdseq_ends_nothing() {
    let mut host = born_host();
    let no_bdseq = payload(None, Vec::new());
    let out = handle(&mut host, "spBv1.0/Plant1/NDEATH/GW1", &no_bdseq, T0).unwrap();
    assert_eq!(out.issues, [Issue::StaleDeath]);
    assert!(out.updates.is_empty());
    let out = handle(&mut host, "spBv1.0/Plant1/NDEATH/GW1", &nbirth(7), T0).unwrap();
    assert!(out.updates.iter().all(|u| !u.connected));
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Arbitrary and mutated payloads under any message kind, in sequence: never a
        /// panic, and the host's memory stays within its bounds.
        #[test]
        fn fuzz_sparkplug_host(
            messages in prop::collection::vec((
                0..8usize,
                0..3usize,
                0..3usize,
                crate::fuzzing::bytes(vec![nbirth(1), dbirth(1), ddata(2, 10, 1.0)]),
            ), 1..24)
        ) {
            const KINDS: [&str; 8] =
                ["NBIRTH", "NDEATH", "NDATA", "DBIRTH", "DDEATH", "DDATA", "NCMD", "DCMD"];
            let settings = HostSettings {
                max_edge_nodes: 2,
                max_metrics_per_node: 16,
                max_name_bytes: 4096,
                ..HostSettings::default()
            };
            let mut host = Host::new(settings);
            for (kind, node, device, body) in messages {
                let kind = KINDS[kind];
                let topic = if kind.starts_with('D') {
                    format!("spBv1.0/g/{kind}/n{node}/d{device}")
                } else {
                    format!("spBv1.0/g/{kind}/n{node}")
                };
                let _ = handle(&mut host, &topic, &body, T0);
                prop_assert!(host.edge_nodes() <= settings.max_edge_nodes);
                prop_assert!(host.bytes <= settings.max_name_bytes);
                for n in host.nodes.values() {
                    prop_assert!(n.entries() <= settings.max_metrics_per_node);
                    prop_assert_eq!(n.bytes, n.count_bytes());
                }
            }
        }
    }
}
