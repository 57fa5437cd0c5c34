//! What a list or watch of DeviceStates selects, parsed once per request and matched against
//! each device without allocating:
//!
//! - `labelSelector`: the Device's labels, in Kubernetes' syntax (`a=b`, `a!=b`, `a in (x,y)`,
//!   `a notin (x)`, `a`, `!a`), matched by kube's own [`Selector`].
//! - `fieldSelector`: `metadata.name`, `metadata.namespace`, `node` and reported values
//!   (`reported.motor.mode=auto`), with `=`, `==` and `!=`, as the API server's field
//!   selectors: a missing field matches `!=` and never `=`.
//! - `where`: comparisons on numeric reported values, relative to `reported`
//!   (`temperature>80,pressure<=2.5`); a missing or non-numeric value matches none.
//!
//! Every part is ANDed. Each is bounded in bytes and terms, so a request cannot make the
//! controller hold or evaluate more than that per device.

use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet};

use kube::core::{Expression, Selector, SelectorExt as _};
use serde_json::{Map, Value};

use crate::doc::Doc;

/// The most bytes a selector or `where` parameter may have.
pub const MAX_QUERY_BYTES: usize = 4096;
/// The most terms one parameter may have.
pub const MAX_TERMS: usize = 32;
/// The most levels of a reported path (as the agent's default depth limit allows).
const MAX_PATH_LEVELS: usize = 16;

/// Why a query was refused (a 400 with this message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// Longer than [`MAX_QUERY_BYTES`].
    #[error("{param} is {bytes} bytes; at most {MAX_QUERY_BYTES} are allowed")]
    TooLong {
        /// The query parameter.
        param: &'static str,
        /// Its length.
        bytes: usize,
    },
    /// More than [`MAX_TERMS`] terms.
    #[error("{param} has {terms} terms; at most {MAX_TERMS} are allowed")]
    TooManyTerms {
        /// The query parameter.
        param: &'static str,
        /// How many it has.
        terms: usize,
    },
    /// A term that does not parse.
    #[error("{param}: invalid term {term:?}: {why}")]
    Invalid {
        /// The query parameter.
        param: &'static str,
        /// The term as given.
        term: String,
        /// What is wrong, and what is accepted.
        why: String,
    },
}

/// One device as the query sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The Device's name.
    pub name: &'a str,
    /// Its namespace.
    pub namespace: &'a str,
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
    /// The EdgeNode it belongs to.
    pub node: &'a str,
    /// Its newest reported document.
    pub reported: &'a Doc,
}

/// A parsed query: labels, fields and comparisons, all of which must match.
#[derive(Debug, Clone, Default)]
pub struct Query {
    labels: Selector,
    fields: Vec<FieldTerm>,
    comparisons: Vec<Comparison>,
}

impl Query {
    /// Parses the three parameters (absent ones select everything).
    pub fn parse(
        label_selector: Option<&str>,
        field_selector: Option<&str>,
        where_: Option<&str>,
    ) -> Result<Self, QueryError> {
        Ok(Self {
            labels: label_selector.map_or(Ok(Selector::default()), parse_labels)?,
            fields: field_selector.map_or(Ok(Vec::new()), parse_fields)?,
            comparisons: where_.map_or(Ok(Vec::new()), parse_where)?,
        })
    }

    /// Whether `c` is selected.
    pub fn matches(&self, c: &Candidate<'_>) -> bool {
        if !self.labels.matches(c.labels) {
            return false;
        }
        // The reported document is read only when a term asks for a value, and once.
        let parsed = OnceCell::new();
        let reported = || parsed.get_or_init(|| c.reported.parse());
        self.fields.iter().all(|f| f.matches(c, &reported))
            && self.comparisons.iter().all(|k| k.matches(reported()))
    }

    /// Whether it selects every device.
    pub fn selects_all(&self) -> bool {
        self.labels.selects_all() && self.fields.is_empty() && self.comparisons.is_empty()
    }
}

/// Splits `s` on commas outside parentheses, checking the byte and term bounds.
fn terms<'a>(param: &'static str, s: &'a str) -> Result<Vec<&'a str>, QueryError> {
    if s.len() > MAX_QUERY_BYTES {
        return Err(QueryError::TooLong {
            param,
            bytes: s.len(),
        });
    }
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, ch) in s.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out.retain(|t| !t.is_empty());
    if out.len() > MAX_TERMS {
        return Err(QueryError::TooManyTerms {
            param,
            terms: out.len(),
        });
    }
    Ok(out)
}

fn invalid(param: &'static str, term: &str, why: impl Into<String>) -> QueryError {
    QueryError::Invalid {
        param,
        term: term.to_owned(),
        why: why.into(),
    }
}

/// A label name (`[prefix/]name`) as Kubernetes validates it.
fn valid_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    prefix_ok && !name.is_empty() && valid_value(name)
}

/// A label value: empty, or up to 63 alphanumerics with `-`, `_` and `.` inside.
fn valid_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

const LABEL_SYNTAX: &str =
    "expected key, !key, key=value, key!=value, key in (a,b) or key notin (a,b)";

/// Parses a label selector in Kubernetes' syntax.
fn parse_labels(s: &str) -> Result<Selector, QueryError> {
    const P: &str = "labelSelector";
    let mut exprs = Vec::new();
    for term in terms(P, s)? {
        let expr = if let Some(key) = term.strip_prefix('!') {
            Expression::DoesNotExist(key.trim().to_owned())
        } else if let Some((key, value)) = term.split_once("!=") {
            Expression::NotEqual(key.trim().to_owned(), value.trim().to_owned())
        } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            Expression::Equal(key.trim().to_owned(), value.trim().to_owned())
        } else if let Some((key, op, set)) = set_term(term) {
            let values: BTreeSet<String> = set
                .split(',')
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .collect();
            if values.is_empty() {
                return Err(invalid(P, term, "an empty set selects nothing"));
            }
            if let Some(bad) = values.iter().find(|v| !valid_value(v)) {
                return Err(invalid(P, term, format!("{bad:?} is not a label value")));
            }
            if op == "in" {
                Expression::In(key.to_owned(), values)
            } else {
                Expression::NotIn(key.to_owned(), values)
            }
        } else {
            Expression::Exists(term.to_owned())
        };
        let (key, value) = match &expr {
            Expression::Equal(k, v) | Expression::NotEqual(k, v) => (k, Some(v)),
            Expression::In(k, _)
            | Expression::NotIn(k, _)
            | Expression::Exists(k)
            | Expression::DoesNotExist(k) => (k, None),
        };
        if !valid_key(key) {
            return Err(invalid(P, term, LABEL_SYNTAX));
        }
        if value.is_some_and(|v| !valid_value(v)) {
            return Err(invalid(
                P,
                term,
                "a label value is up to 63 alphanumerics, '-', '_' or '.'",
            ));
        }
        exprs.push(expr);
    }
    let mut selector = Selector::default();
    selector.extend(exprs);
    Ok(selector)
}

/// `key in (a,b)` / `key notin (a,b)` as (key, operator, the text between the parentheses).
fn set_term(term: &str) -> Option<(&str, &str, &str)> {
    let open = term.find('(')?;
    let inner = term[open + 1..].strip_suffix(')')?;
    let mut head = term[..open].split_whitespace();
    let (key, op) = (head.next()?, head.next()?);
    (head.next().is_none() && matches!(op, "in" | "notin")).then_some((key, op, inner))
}

/// What a field term looks at.
#[derive(Debug, Clone, PartialEq)]
enum Field {
    Name,
    Namespace,
    Node,
    Reported(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
struct FieldTerm {
    field: Field,
    value: String,
    /// The value read as a JSON number, boolean or null, compared with reported leaves of
    /// those types.
    scalar: Option<Value>,
    equal: bool,
}

impl FieldTerm {
    fn matches<'m>(
        &self,
        c: &Candidate<'_>,
        reported: &dyn Fn() -> &'m Map<String, Value>,
    ) -> bool {
        let same = match &self.field {
            Field::Name => c.name == self.value,
            Field::Namespace => c.namespace == self.value,
            Field::Node => c.node == self.value,
            Field::Reported(path) => leaf(reported(), path).is_some_and(|v| match v {
                Value::String(s) => *s == self.value,
                Value::Number(_) | Value::Bool(_) | Value::Null => self.scalar.as_ref() == Some(v),
                Value::Array(_) | Value::Object(_) => false,
            }),
        };
        same == self.equal
    }
}

/// A dotted path of at most [`MAX_PATH_LEVELS`] non-empty keys.
fn path(param: &'static str, term: &str, dotted: &str) -> Result<Vec<String>, QueryError> {
    let keys: Vec<String> = dotted.split('.').map(str::to_owned).collect();
    if keys.iter().any(String::is_empty) || keys.len() > MAX_PATH_LEVELS {
        return Err(invalid(
            param,
            term,
            format!("a path is up to {MAX_PATH_LEVELS} non-empty keys joined by '.'"),
        ));
    }
    Ok(keys)
}

/// The value at `path` under `reported`.
fn leaf<'a>(reported: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (last, parents) = path.split_last()?;
    let mut object = reported;
    for key in parents {
        object = object.get(key)?.as_object()?;
    }
    object.get(last)
}

/// Parses a field selector.
fn parse_fields(s: &str) -> Result<Vec<FieldTerm>, QueryError> {
    const P: &str = "fieldSelector";
    let mut out = Vec::new();
    for term in terms(P, s)? {
        let (name, value, equal) = if let Some((n, v)) = term.split_once("!=") {
            (n, v, false)
        } else if let Some((n, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (n, v, true)
        } else {
            return Err(invalid(P, term, "expected field=value or field!=value"));
        };
        let name = name.trim();
        let field = match name {
            "metadata.name" => Field::Name,
            "metadata.namespace" => Field::Namespace,
            "node" => Field::Node,
            _ => match name.strip_prefix("reported.") {
                Some(p) => Field::Reported(path(P, term, p)?),
                None => {
                    return Err(invalid(
                        P,
                        term,
                        "fields are metadata.name, metadata.namespace, node and reported.<path>",
                    ));
                }
            },
        };
        let value = value.trim().to_owned();
        let scalar = serde_json::from_str::<Value>(&value)
            .ok()
            .filter(|v| !v.is_string() && !v.is_array() && !v.is_object());
        out.push(FieldTerm {
            field,
            value,
            scalar,
            equal,
        });
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Debug, Clone, PartialEq)]
struct Comparison {
    path: Vec<String>,
    op: Op,
    bound: f64,
}

impl Comparison {
    fn matches(&self, reported: &Map<String, Value>) -> bool {
        let Some(v) = leaf(reported, &self.path).and_then(Value::as_f64) else {
            return false;
        };
        match self.op {
            Op::Lt => v < self.bound,
            Op::Le => v <= self.bound,
            Op::Gt => v > self.bound,
            Op::Ge => v >= self.bound,
            Op::Eq => v == self.bound,
            Op::Ne => v != self.bound,
        }
    }
}

/// Parses the `where` parameter: comparisons of numeric reported values with numbers.
fn parse_where(s: &str) -> Result<Vec<Comparison>, QueryError> {
    const P: &str = "where";
    // Two-character operators first, so `>=` is not read as `>` and `=...`.
    const OPS: [(&str, Op); 6] = [
        (">=", Op::Ge),
        ("<=", Op::Le),
        ("==", Op::Eq),
        ("!=", Op::Ne),
        (">", Op::Gt),
        ("<", Op::Lt),
    ];
    let mut out = Vec::new();
    for term in terms(P, s)? {
        let Some((at, text, op)) = OPS
            .iter()
            .filter_map(|(text, op)| term.find(text).map(|at| (at, *text, *op)))
            .min_by_key(|(at, text, _)| (*at, std::cmp::Reverse(text.len())))
        else {
            return Err(invalid(
                P,
                term,
                "expected path<op>number with <, <=, >, >=, == or !=",
            ));
        };
        let (name, bound) = (term[..at].trim(), term[at + text.len()..].trim());
        let bound: f64 = bound
            .parse()
            .ok()
            .filter(|b: &f64| b.is_finite())
            .ok_or_else(|| invalid(P, term, format!("{bound:?} is not a finite number")))?;
        out.push(Comparison {
            path: path(P, term, name)?,
            op,
            bound,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn device<'a>(labels: &'a BTreeMap<String, String>, reported: &'a Doc) -> Candidate<'a> {
        Candidate {
            name: "press-1",
            namespace: "plant-a",
            labels,
            node: "edge-1",
            reported,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn reported(v: Value) -> Doc {
        Doc::of(v.as_object().unwrap())
    }

    fn selects(q: (Option<&str>, Option<&str>, Option<&str>), c: &Candidate<'_>) -> bool {
        Query::parse(q.0, q.1, q.2).unwrap().matches(c)
    }

    #[test]
    fn label_selectors_follow_kubernetes() {
        let l = labels(&[("line", "a"), ("edgesync.io/kind", "press")]);
        let r = reported(json!({}));
        let c = device(&l, &r);
        for (selector, expected) in [
            ("line=a", true),
            ("line==a", true),
            ("line!=a", false),
            ("line in (a, b)", true),
            ("line notin (a,b)", false),
            ("line,edgesync.io/kind=press", true),
            ("line in (b,c),edgesync.io/kind=press", false),
            ("!line", false),
            ("!zone", true),
            ("zone!=x", true),
            ("zone in (x)", false),
            ("", true),
        ] {
            assert_eq!(
                selects((Some(selector), None, None), &c),
                expected,
                "{selector}"
            );
        }
        for bad in [
            "line=a b",
            "-line=a",
            "line in ()",
            "line in (a",
            "a/b/c=d",
            "x=y=z",
        ] {
            let e = Query::parse(Some(bad), None, None).unwrap_err();
            assert!(
                e.to_string().starts_with("labelSelector: invalid term"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn field_selectors_read_metadata_node_and_reported_leaves() {
        let l = labels(&[]);
        let r = reported(json!({"motor": {"mode": "auto", "rpm": 1200}, "on": true}));
        let c = device(&l, &r);
        for (selector, expected) in [
            ("metadata.name=press-1", true),
            ("metadata.namespace!=plant-a", false),
            ("node==edge-1", true),
            ("reported.motor.mode=auto", true),
            ("reported.motor.mode!=auto", false),
            ("reported.motor.rpm=1200", true),
            ("reported.on=true", true),
            // A missing field is never equal, and always different.
            ("reported.motor.temp=1", false),
            ("reported.motor.temp!=1", true),
            // An object is not a value.
            ("reported.motor=auto", false),
        ] {
            assert_eq!(
                selects((None, Some(selector), None), &c),
                expected,
                "{selector}"
            );
        }
        for bad in [
            "status.x=1",
            "reported..a=1",
            "reported.a",
            "spec.desired=1",
        ] {
            assert!(Query::parse(None, Some(bad), None).is_err(), "{bad}");
        }
    }

    #[test]
    fn comparisons_need_a_number_on_both_sides() {
        let l = labels(&[]);
        let r = reported(json!({"temperature": 81.5, "line": {"pressure": 2}, "mode": "auto"}));
        let c = device(&l, &r);
        for (query, expected) in [
            ("temperature>80", true),
            ("temperature >= 81.5", true),
            ("temperature<80", false),
            ("temperature<=81.5,line.pressure==2", true),
            ("line.pressure!=2", false),
            ("temperature>80,line.pressure>2", false),
            // Missing or not a number: no match either way.
            ("humidity<100", false),
            ("mode>0", false),
            ("mode!=0", false),
        ] {
            assert_eq!(selects((None, None, Some(query)), &c), expected, "{query}");
        }
        for bad in [
            "temperature",
            "temperature>hot",
            "temperature>NaN",
            ">5",
            "a..b<1",
        ] {
            let e = Query::parse(None, None, Some(bad)).unwrap_err();
            assert!(
                e.to_string().starts_with("where: invalid term"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn parts_are_anded_and_bounded() {
        let l = labels(&[("line", "a")]);
        let r = reported(json!({"temperature": 90}));
        let c = device(&l, &r);
        assert!(selects(
            (Some("line=a"), Some("node=edge-1"), Some("temperature>80")),
            &c
        ));
        assert!(!selects(
            (Some("line=b"), Some("node=edge-1"), Some("temperature>80")),
            &c
        ));
        assert!(Query::parse(None, None, None).unwrap().selects_all());
        let many = vec!["a=b"; MAX_TERMS + 1].join(",");
        assert!(matches!(
            Query::parse(Some(&many), None, None),
            Err(QueryError::TooManyTerms { .. })
        ));
        let long = format!("a={}", "b".repeat(MAX_QUERY_BYTES));
        assert!(matches!(
            Query::parse(None, Some(&long), None),
            Err(QueryError::TooLong { .. })
        ));
    }
}
