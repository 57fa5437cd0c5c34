//! Writes `crds/device.yaml` and `crds/edgenode.yaml` from the Rust types.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, yaml) in edgesync_crds::crd_files() {
        let path = dir.join(name);
        std::fs::write(&path, yaml)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
