//! Output as kubectl prints it: an aligned table with upper-case headers, or the objects as
//! JSON or YAML.

use serde_json::Value;

use crate::cli::Output;

/// Prints `rows` under `headers`, columns three spaces apart, or `objects` as JSON or YAML.
pub fn print(output: Option<Output>, headers: &[&str], rows: &[Vec<String>], objects: Value) {
    match output {
        Some(Output::Json) => println!(
            "{}",
            serde_json::to_string_pretty(&objects).unwrap_or_default()
        ),
        Some(Output::Yaml) => print!("{}", yaml_serde::to_string(&objects).unwrap_or_default()),
        None | Some(Output::Wide) => print!("{}", render(headers, rows)),
    }
}

/// The table as text.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            out.push_str(cell);
            if i < last {
                out.push_str(&" ".repeat(w - cell.chars().count() + 3));
            }
        }
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// A cell for an optional value (`<none>` as kubectl shows missing values).
pub fn cell<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "<none>".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let t = render(
            &["NAME", "READY"],
            &[
                vec!["a-long-name".into(), "True".into()],
                vec!["b".into(), "False".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME          READY\na-long-name   True\nb             False\n"
        );
    }
}
