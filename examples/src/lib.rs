//! Sample resources shipped in `examples/` (Device and EdgeNode YAML, agent config), kept
//! honest by tests that parse them with the real types.

/// Sample `EdgeNode` with its token Secret.
pub const EDGENODE_YAML: &str = include_str!("../edgenode.yaml");
/// Sample `Device`s.
pub const DEVICES_YAML: &str = include_str!("../devices.yaml");

#[cfg(test)]
mod tests {
    use edgesync_crds::{Device, EdgeNode};
    use serde::Deserialize;

    fn docs(text: &str) -> Vec<serde_json::Value> {
        yaml_serde::Deserializer::from_str(text)
            .map(|d| serde_json::Value::deserialize(d).expect("sample YAML parses"))
            .collect()
    }

    #[test]
    fn sample_devices_parse_as_devices() {
        let docs = docs(super::DEVICES_YAML);
        assert!(docs.len() >= 2);
        for d in docs {
            let dev: Device = serde_json::from_value(d).expect("sample is a valid Device");
            assert!(!dev.spec.node_name.is_empty());
        }
    }

    #[test]
    fn sample_edgenode_parses() {
        let docs = docs(super::EDGENODE_YAML);
        let node = docs
            .into_iter()
            .find(|d| d["kind"] == "EdgeNode")
            .expect("sample has an EdgeNode");
        let node: EdgeNode = serde_json::from_value(node).expect("sample is a valid EdgeNode");
        assert_eq!(node.spec.token_secret_ref.key, "token");
    }
}
