//! The documentation is run as written: every ```sh block in docs/ is executed (offline, with
//! the three binaries on the PATH), every command-line flag it gives our binaries exists in
//! their --help, every ```toml block uses only keys examples/agent.toml documents, and every
//! metric it names is one the binaries export. Blocks that need a cluster or a broker are
//! written as ```console and are not run.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use edgesync_e2e::agent::agent_binary;
use edgesync_e2e::controller::controller_binary;
use edgesync_e2e::{release_binary, workspace_root};

/// The binaries the docs talk about, by the name they are invoked as.
fn binaries() -> Vec<(&'static str, PathBuf)> {
    vec![
        ("edgesync-agent", agent_binary()),
        ("edgesync-controller", controller_binary()),
        (
            "kubectl-edgesync",
            release_binary("kubectl-edgesync", "kubectl-edgesync", "plugin"),
        ),
    ]
}

fn docs() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    let mut dirs = vec![workspace_root().join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                let text = std::fs::read_to_string(&path).unwrap();
                files.push((path, text));
            }
        }
    }
    files.sort();
    assert!(files.len() >= 5, "docs/ holds the guides");
    files
}

/// `(info string, first line number, body)` of each fenced block.
fn blocks(text: &str) -> Vec<(String, usize, String)> {
    let mut out = Vec::new();
    let mut open: Option<(String, usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        match (&mut open, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) => open = Some((info.trim().to_owned(), i + 2, String::new())),
            (Some(_), Some(_)) => out.push(open.take().unwrap()),
            (Some((_, _, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}

fn name(path: &Path) -> String {
    path.strip_prefix(workspace_root())
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn sh_blocks_run_as_written() {
    let bins = binaries();
    let mut path = bins
        .iter()
        .map(|(_, p)| p.parent().unwrap().display().to_string())
        .collect::<Vec<_>>();
    path.push(std::env::var("PATH").unwrap_or_default());
    let mut ran = 0;
    for (file, text) in docs() {
        for (info, line, body) in blocks(&text) {
            if info != "sh" {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let out = Command::new("timeout")
                .args(["60", "bash", "-euo", "pipefail", "-c", &body])
                .current_dir(dir.path())
                .env("PATH", path.join(":"))
                .env("EDGESYNC_REPO", workspace_root())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}:{line}: the sh block failed ({:?}); run it as written, or mark a block that needs a cluster or a broker ```console:\n{body}\nstdout:\n{}\nstderr:\n{}",
                name(&file),
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ran += 1;
        }
    }
    eprintln!("{ran} sh blocks ran");
}

/// Every `--flag` of every subcommand of our binaries, from their --help.
fn known_flags(bins: &[(&'static str, PathBuf)]) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    for (_, bin) in bins {
        let mut pending = vec![vec![]];
        while let Some(sub) = pending.pop() {
            let out = Command::new(bin).args(&sub).arg("--help").output().unwrap();
            let help = String::from_utf8_lossy(&out.stdout).to_string();
            let mut in_commands = false;
            for line in help.lines() {
                if line.starts_with("Commands:") {
                    in_commands = true;
                    continue;
                }
                if in_commands {
                    match line.split_whitespace().next() {
                        Some(c) if line.starts_with("  ") && c != "help" => {
                            let mut next = sub.clone();
                            next.push(c.to_owned());
                            pending.push(next);
                        }
                        Some(_) => {}
                        None => in_commands = false,
                    }
                }
                flags.extend(flag_tokens(line));
            }
        }
    }
    flags
}

fn flag_tokens(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2 && w.as_bytes()[2].is_ascii_lowercase())
        .map(str::to_owned)
        .collect()
}

/// Whether `line` runs one of our binaries (after a prompt, sudo or environment settings).
fn invokes_ours(line: &str) -> bool {
    let words: Vec<&str> = line
        .split_whitespace()
        .skip_while(|w| *w == "$" || *w == "sudo" || w.contains('='))
        .collect();
    match words.as_slice() {
        [first, ..]
            if first.ends_with("edgesync-agent")
                || first.ends_with("edgesync-controller")
                || first.ends_with("kubectl-edgesync") =>
        {
            true
        }
        ["kubectl", "edgesync", ..] => true,
        _ => false,
    }
}

#[test]
fn flags_given_to_our_binaries_exist() {
    let known = known_flags(&binaries());
    assert!(
        known.contains("--write-qps") && known.contains("--config"),
        "{known:?}"
    );
    let mut unknown = Vec::new();
    for (file, text) in docs() {
        let mut in_block = false;
        for (i, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("```") {
                in_block = !in_block;
                continue;
            }
            let mut candidates = Vec::new();
            if invokes_ours(line) {
                candidates.extend(flag_tokens(line));
            }
            if !in_block {
                // Prose: a flag alone in backticks is one of ours.
                for span in line.split('`').skip(1).step_by(2) {
                    if span.starts_with("--") && !span.contains(' ') {
                        candidates.extend(flag_tokens(span));
                    }
                }
            }
            for flag in candidates {
                if !known.contains(&flag) {
                    unknown.push(format!("{}:{}: {flag}", name(&file), i + 1));
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "flags no --help lists:\n{}",
        unknown.join("\n")
    );
}

/// `section.key` for every key examples/agent.toml sets or shows commented out.
fn documented_keys() -> BTreeSet<String> {
    let text = std::fs::read_to_string(workspace_root().join("examples/agent.toml")).unwrap();
    let mut keys = BTreeSet::new();
    let mut section = String::new();
    for line in text.lines() {
        let l = line.trim_start_matches('#').trim();
        if let Some(s) = l.strip_prefix('[') {
            if let Some(end) = s.find(']') {
                section = s[..end].trim_matches(['[', ']']).to_owned();
            }
            continue;
        }
        if let Some((k, _)) = l.split_once('=') {
            let k = k.trim();
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
            {
                keys.insert(if section.is_empty() {
                    k.to_owned()
                } else {
                    format!("{section}.{k}")
                });
            }
        }
    }
    keys
}

fn toml_paths(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
    if let toml::Value::Table(t) = v {
        for (k, v) in t {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(_) => toml_paths(v, &path, out),
                toml::Value::Array(items)
                    if items.iter().all(toml::Value::is_table) && !items.is_empty() =>
                {
                    for item in items {
                        toml_paths(item, &path, out);
                    }
                }
                _ => out.push(path),
            }
        }
    }
}

#[test]
fn toml_blocks_use_documented_keys() {
    let keys = documented_keys();
    assert!(
        keys.contains("uplink.batch_window_ms") && keys.contains("ingest.format"),
        "{keys:?}"
    );
    let mut bad = Vec::new();
    for (file, text) in docs() {
        for (info, line, body) in blocks(&text) {
            if info != "toml" {
                continue;
            }
            let value: toml::Value = match toml::from_str(&body) {
                Ok(v) => v,
                Err(e) => {
                    bad.push(format!("{}:{line}: not TOML: {e}", name(&file)));
                    continue;
                }
            };
            let mut paths = Vec::new();
            toml_paths(&value, "", &mut paths);
            bad.extend(
                paths
                    .into_iter()
                    .filter(|p| !keys.contains(p))
                    .map(|p| format!("{}:{line}: {p} is not in examples/agent.toml", name(&file))),
            );
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn metrics_named_are_exported() {
    let mut sources = String::new();
    for dir in ["agent/src", "cloud-controller/src"] {
        let mut dirs = vec![workspace_root().join(dir)];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    sources.push_str(&std::fs::read_to_string(p).unwrap_or_default());
                }
            }
        }
    }
    let mut unknown = Vec::new();
    for (file, text) in docs() {
        for (i, _) in text.match_indices("edgesync_") {
            let metric: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !(metric.starts_with("edgesync_agent_")
                || metric.starts_with("edgesync_controller_"))
            {
                continue;
            }
            // A counter is registered without `_total` (its samples carry it), a histogram
            // without its sample suffixes.
            let base = ["_bucket", "_sum", "_count", "_total"]
                .iter()
                .find_map(|s| metric.strip_suffix(s))
                .unwrap_or(&metric);
            if !sources.contains(&metric) && !sources.contains(base) {
                unknown.push(format!("{}: {metric}", name(&file)));
            }
        }
    }
    unknown.dedup();
    assert!(
        unknown.is_empty(),
        "metrics no binary exports:\n{}",
        unknown.join("\n")
    );
}
