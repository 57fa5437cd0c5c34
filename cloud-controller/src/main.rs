//! `edgesync-controller` entry point. The binary is a placeholder until its issue lands; it exits with an
//! error rather than pretending to work.

fn main() -> std::process::ExitCode {
    eprintln!(
        "edgesync-controller {}: not implemented yet",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::from(2)
}
