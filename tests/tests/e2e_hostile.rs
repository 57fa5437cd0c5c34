//! End to end, hostile input at both doors while good traffic flows: malformed, oversized,
//! deeply nested, wrong-type and invalid-id messages over MQTT; wrong or missing tokens,
//! another node's device, malformed and huge bodies over HTTP. Each gets its clear error, and
//! every other device's state in Kubernetes is exactly what its good messages said.

// Integration tests: a failed unwrap is a failed test with its location.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use edgesync_e2e::cluster::ControlPlane;
use edgesync_e2e::controller::{batch, create_devices, create_node, post_batch, post_raw, report};
use edgesync_e2e::device::TestDevice;
use edgesync_e2e::stack::{Stack, StackOptions, publish_acked, wait_reported};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_at_both_doors_changes_nothing_else() {
    let cp = ControlPlane::shared();
    let stack = Stack::start(cp, "e2e-hostile", StackOptions::default()).await;
    let ns = stack.ns.name.clone();
    let good: Vec<String> = (0..10).map(|i| format!("good-{i}")).collect();
    create_devices(cp, &ns, "edge-1", &good);
    create_node(cp, &ns, "edge-2", "other-token", "");
    create_devices(cp, &ns, "edge-2", &["foreign-1".into()]);
    let devices = stack.devices().await;
    let port = stack.broker.port();
    let round = |n: u64| -> (Vec<(String, String)>, HashMap<String, Value>) {
        let msgs = good
            .iter()
            .map(|d| (format!("factory/{d}/state"), json!({"n": n}).to_string()))
            .collect();
        (msgs, good.iter().map(|d| (d.clone(), json!(n))).collect())
    };
    let (msgs, last) = round(1);
    publish_acked(port, "hostile-good", msgs).await;
    wait_reported(&devices, "n", &last, Duration::from_secs(60)).await;

    // MQTT door.
    let mut dev = TestDevice::connect("hostile-mqtt", port, "edgesync/#").await;
    let deep = json!({"state":{"reported":{"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}}});
    let cases: Vec<(&str, Vec<u8>, u64)> = vec![
        ("edgesync/good-0/shadow/update", b"{not json".to_vec(), 400),
        (
            "edgesync/good-0/shadow/update",
            json!({"state":{"reported":[1,2]}}).to_string().into_bytes(),
            400,
        ),
        (
            "edgesync/good-0/shadow/update",
            deep.to_string().into_bytes(),
            400,
        ),
        (
            "edgesync/good-0/shadow/update",
            format!(
                "{{\"state\":{{\"reported\":{{\"x\":\"{}\"}}}}}}",
                "y".repeat(200 * 1024)
            )
            .into_bytes(),
            413,
        ),
        (
            "edgesync/good-0/shadow/update",
            json!({"state":{"reported":{"n":99}},"version":12345})
                .to_string()
                .into_bytes(),
            409,
        ),
        (
            "edgesync/Not_A_Name/shadow/update",
            json!({"state":{"reported":{"n":99}}})
                .to_string()
                .into_bytes(),
            400,
        ),
    ];
    for (topic, payload, code) in cases {
        dev.publish(topic, payload).await;
        let r = dev.expect(&format!("{topic}/rejected")).await;
        assert_eq!(r["code"], code, "{topic}: {r}");
        assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
    }
    // Plain ingest has no reply topic: garbage there is dropped and counted.
    dev.publish("factory/good-1/state", "garbage").await;
    dev.publish("factory/good-1/state", "[1,2,3]").await;

    // HTTP door, straight at the controller (as a rogue client on the network would).
    let url = stack.controller.url();
    let body =
        serde_json::to_vec(&batch(1, vec![report("good-2", 1000, json!({"n": 666}))])).unwrap();
    assert_eq!(
        post_raw(&url, &ns, "edge-1", None, body.clone(), false)
            .await
            .status,
        401
    );
    assert_eq!(
        post_raw(
            &url,
            &ns,
            "edge-1",
            Some("other-token"),
            body.clone(),
            false
        )
        .await
        .status,
        401
    );
    let a = post_batch(
        &url,
        &ns,
        "edge-2",
        "other-token",
        &batch(1, vec![report("good-3", 1000, json!({"n": 666}))]),
    )
    .await;
    assert_eq!(
        (a.status, a.result(0)),
        (200, "rejected"),
        "another node's device: {a:?}"
    );
    assert_eq!(
        post_raw(
            &url,
            &ns,
            "edge-1",
            Some(&stack.token),
            b"{\"seq\":".to_vec(),
            false
        )
        .await
        .status,
        400
    );
    assert_eq!(
        post_raw(
            &url,
            &ns,
            "edge-1",
            Some(&stack.token),
            vec![b'['; 20 * 1024 * 1024],
            false
        )
        .await
        .status,
        413
    );

    // Good traffic goes on, and every device shows exactly its good state.
    let (msgs, last) = round(2);
    publish_acked(port, "hostile-good", msgs).await;
    wait_reported(&devices, "n", &last, Duration::from_secs(60)).await;
    for d in &good {
        let reported = devices
            .get(d)
            .await
            .unwrap()
            .status
            .unwrap()
            .reported
            .unwrap();
        assert_eq!(Value::Object(reported), json!({"n": 2}), "{d}");
    }
    // Its conditions are the liveness loop's (its node never reported); nothing was reported.
    let foreign = devices
        .get("foreign-1")
        .await
        .unwrap()
        .status
        .unwrap_or_default();
    assert_eq!(
        (foreign.reported, foreign.reported_version),
        (None, None),
        "another node's device untouched"
    );
    assert_eq!(
        devices.list(&Default::default()).await.unwrap().items.len(),
        11,
        "no Device was created by hostile input"
    );
}
