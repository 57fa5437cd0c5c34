//! Who is asking, as an aggregated API server learns it: the API server proxies each request
//! with its front-proxy client certificate and names the user in headers. Only a connection
//! whose client certificate chains to the request-header CA (checked by the TLS layer) and,
//! when the cluster names any, carries one of the allowed common names may set those
//! headers; anything else is refused before a header is read.
//!
//! The settings come from the `kube-system/extension-apiserver-authentication` ConfigMap, the
//! same place every aggregated server reads them from. What a user may do is then asked of
//! the API server with a SubjectAccessReview ([`access_review`]), whose answers are kept
//! briefly ([`Decisions`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};

use super::wire::{GROUP, RESOURCE};

/// The request-header settings of `extension-apiserver-authentication`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHeader {
    /// PEM of the CA the front-proxy client certificate must chain to.
    pub client_ca_pem: String,
    /// Common names allowed to proxy (empty: any the CA signed).
    pub allowed_names: Vec<String>,
    /// Headers naming the user, first non-empty wins (usually `X-Remote-User`).
    pub username_headers: Vec<String>,
    /// Headers naming groups, every value of each (usually `X-Remote-Group`).
    pub group_headers: Vec<String>,
    /// Prefixes of headers carrying extra attributes (usually `X-Remote-Extra-`).
    pub extra_prefixes: Vec<String>,
}

/// What is wrong with the ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A key every cluster with aggregation sets is missing.
    #[error(
        "kube-system/extension-apiserver-authentication has no {0}: start kube-apiserver with --requestheader-client-ca-file and the other --requestheader-* flags"
    )]
    Missing(&'static str),
    /// A list key is not a JSON array of strings.
    #[error("kube-system/extension-apiserver-authentication: {key} is not a JSON list of strings")]
    NotAList {
        /// The key.
        key: &'static str,
    },
}

impl RequestHeader {
    /// Reads the ConfigMap's `data`.
    pub fn from_configmap(data: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let list = |key: &'static str| -> Result<Vec<String>, ConfigError> {
            data.get(key).map_or(Ok(Vec::new()), |v| {
                serde_json::from_str::<Option<Vec<String>>>(v)
                    .map(Option::unwrap_or_default)
                    .map_err(|_| ConfigError::NotAList { key })
            })
        };
        let client_ca_pem = data
            .get("requestheader-client-ca-file")
            .filter(|v| !v.trim().is_empty())
            .ok_or(ConfigError::Missing("requestheader-client-ca-file"))?
            .clone();
        let username_headers = list("requestheader-username-headers")?;
        if username_headers.is_empty() {
            return Err(ConfigError::Missing("requestheader-username-headers"));
        }
        Ok(Self {
            client_ca_pem,
            allowed_names: list("requestheader-allowed-names")?,
            username_headers,
            group_headers: list("requestheader-group-headers")?,
            extra_prefixes: list("requestheader-extra-headers-prefix")?,
        })
    }

    /// The user a proxied request names. `common_name` is that of the client certificate
    /// the TLS layer verified against [`RequestHeader::client_ca_pem`].
    pub fn user(&self, common_name: &str, headers: &HeaderMap) -> Result<User, Refused> {
        if !self.allowed_names.is_empty() && !self.allowed_names.iter().any(|n| n == common_name) {
            return Err(Refused::NotAllowedProxy(common_name.to_owned()));
        }
        let text = |v: &axum::http::HeaderValue| v.to_str().ok().map(str::to_owned);
        let name = self
            .username_headers
            .iter()
            .flat_map(|h| headers.get_all(h.as_str()))
            .filter_map(text)
            .find(|v| !v.is_empty())
            .ok_or(Refused::NoUser)?;
        let groups = self
            .group_headers
            .iter()
            .flat_map(|h| headers.get_all(h.as_str()))
            .filter_map(text)
            .collect();
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (header, value) in headers {
            let header = header.as_str();
            let Some(key) = self.extra_prefixes.iter().find_map(|p| {
                header
                    .get(..p.len())
                    .filter(|h| h.eq_ignore_ascii_case(p))
                    .map(|_| &header[p.len()..])
            }) else {
                continue;
            };
            // Keys are percent-encoded by the API server (`acme.com%2Fproject`).
            let key = percent_encoding::percent_decode_str(key).decode_utf8();
            if let (Some(value), Ok(key)) = (text(value), key) {
                extra
                    .entry(key.to_ascii_lowercase())
                    .or_default()
                    .push(value);
            }
        }
        Ok(User {
            name,
            groups,
            extra,
        })
    }
}

/// A user as the API server authenticated them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct User {
    /// The user name.
    pub name: String,
    /// Their groups.
    pub groups: Vec<String>,
    /// Extra attributes (scopes and the like).
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Why a request was refused before any authorisation (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The client certificate's name is not one the cluster allows to proxy.
    #[error("client certificate {0:?} is not one of requestheader-allowed-names")]
    NotAllowedProxy(String),
    /// No user header.
    #[error("the proxied request names no user")]
    NoUser,
}

/// The SubjectAccessReview that asks whether `user` may `verb` DeviceStates in `namespace`
/// (all namespaces when `None`), one by `name` when given.
pub fn access_review(
    user: &User,
    verb: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            groups: (!user.groups.is_empty()).then(|| user.groups.clone()),
            extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                resource: Some(RESOURCE.into()),
                verb: Some(verb.into()),
                namespace: namespace.map(str::to_owned),
                name: name.map(str::to_owned),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    }
}

/// What was asked: user, verb, namespace and name.
type Question = (User, String, Option<String>, Option<String>);

/// Recent authorisation answers, kept for `ttl` (allowed and denied alike, as the API
/// server's webhook authoriser caches them), at most `capacity` of them: oldest go first.
#[derive(Debug)]
pub struct Decisions {
    ttl: Duration,
    capacity: usize,
    answers: HashMap<Question, (bool, Instant)>,
    order: VecDeque<(Question, Instant)>,
}

impl Decisions {
    /// An empty cache.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity: capacity.max(1),
            answers: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The answer to `question` if asked within `ttl` of `now`.
    pub fn get(&self, question: &Question, now: Instant) -> Option<bool> {
        self.answers
            .get(question)
            .filter(|(_, at)| now.saturating_duration_since(*at) < self.ttl)
            .map(|(allowed, _)| *allowed)
    }

    /// Keeps an answer got at `now`; past `capacity`, the oldest answers go.
    pub fn put(&mut self, question: Question, allowed: bool, now: Instant) {
        self.answers.insert(question.clone(), (allowed, now));
        self.order.push_back((question, now));
        // `order` also holds superseded entries of questions asked again: dropped now and
        // then, so it stays within twice the capacity (amortised over the puts between).
        if self.order.len() > 2 * self.capacity {
            let answers = &self.answers;
            self.order
                .retain(|(q, at)| answers.get(q).is_some_and(|(_, t)| t == at));
        }
        while self.answers.len() > self.capacity {
            let Some((oldest, at)) = self.order.pop_front() else {
                break;
            };
            if self.answers.get(&oldest).is_some_and(|(_, t)| *t == at) {
                self.answers.remove(&oldest);
            }
        }
    }

    /// Answers kept.
    pub fn len(&self) -> usize {
        self.answers.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configmap() -> BTreeMap<String, String> {
        [
            (
                "requestheader-client-ca-file",
                "-----BEGIN CERTIFICATE-----\n...",
            ),
            ("requestheader-allowed-names", r#"["front-proxy-client"]"#),
            ("requestheader-username-headers", r#"["X-Remote-User"]"#),
            ("requestheader-group-headers", r#"["X-Remote-Group"]"#),
            (
                "requestheader-extra-headers-prefix",
                r#"["X-Remote-Extra-"]"#,
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_configmap_gives_the_settings_and_says_what_is_missing() {
        let rh = RequestHeader::from_configmap(&configmap()).unwrap();
        assert_eq!(rh.allowed_names, ["front-proxy-client"]);
        assert_eq!(rh.extra_prefixes, ["X-Remote-Extra-"]);
        let mut no_ca = configmap();
        no_ca.remove("requestheader-client-ca-file");
        let e = RequestHeader::from_configmap(&no_ca).unwrap_err();
        assert!(
            e.to_string().contains("--requestheader-client-ca-file"),
            "{e}"
        );
        let mut bad = configmap();
        bad.insert(
            "requestheader-group-headers".into(),
            "X-Remote-Group".into(),
        );
        assert_eq!(
            RequestHeader::from_configmap(&bad),
            Err(ConfigError::NotAList {
                key: "requestheader-group-headers"
            })
        );
        // `null` lists, as kube-apiserver writes unset ones, are empty.
        let mut null = configmap();
        null.insert("requestheader-allowed-names".into(), "null".into());
        assert!(
            RequestHeader::from_configmap(&null)
                .unwrap()
                .allowed_names
                .is_empty()
        );
    }

    #[test]
    fn users_come_from_the_headers_of_an_allowed_proxy_only() {
        let rh = RequestHeader::from_configmap(&configmap()).unwrap();
        let h = headers(&[
            ("x-remote-user", "alice"),
            ("x-remote-group", "operators"),
            ("x-remote-group", "system:authenticated"),
            ("x-remote-extra-scopes", "a"),
            ("x-remote-extra-acme.com%2Fproject", "p1"),
        ]);
        let user = rh.user("front-proxy-client", &h).unwrap();
        assert_eq!(user.name, "alice");
        assert_eq!(user.groups, ["operators", "system:authenticated"]);
        assert_eq!(user.extra["scopes"], ["a"]);
        assert_eq!(user.extra["acme.com/project"], ["p1"]);
        assert_eq!(
            rh.user("someone-else", &h),
            Err(Refused::NotAllowedProxy("someone-else".into()))
        );
        assert_eq!(
            rh.user("front-proxy-client", &headers(&[("x-remote-group", "g")])),
            Err(Refused::NoUser)
        );
        // No allowed names: any certificate the CA signed may proxy.
        let mut any = configmap();
        any.insert("requestheader-allowed-names".into(), "[]".into());
        let rh = RequestHeader::from_configmap(&any).unwrap();
        assert!(rh.user("whoever", &h).is_ok());
    }

    #[test]
    fn reviews_ask_about_devicestates_and_answers_expire() {
        let user = User {
            name: "alice".into(),
            groups: vec!["operators".into()],
            extra: BTreeMap::new(),
        };
        let sar = access_review(&user, "list", Some("plant-a"), None);
        let attrs = sar.spec.resource_attributes.unwrap();
        assert_eq!(attrs.group.as_deref(), Some("live.edgesync.io"));
        assert_eq!(attrs.resource.as_deref(), Some("devicestates"));
        assert_eq!(attrs.verb.as_deref(), Some("list"));
        assert_eq!(attrs.namespace.as_deref(), Some("plant-a"));
        assert_eq!(sar.spec.user.as_deref(), Some("alice"));

        let t0 = Instant::now();
        let q = |ns: &str| (user.clone(), "get".to_owned(), Some(ns.to_owned()), None);
        let mut d = Decisions::new(Duration::from_secs(10), 2);
        d.put(q("a"), true, t0);
        d.put(q("b"), false, t0);
        assert_eq!(d.get(&q("a"), t0 + Duration::from_secs(9)), Some(true));
        assert_eq!(d.get(&q("b"), t0), Some(false));
        assert_eq!(d.get(&q("a"), t0 + Duration::from_secs(10)), None);
        // Bounded: a third answer pushes out the oldest, and asking again is bounded too.
        d.put(q("c"), true, t0 + Duration::from_secs(1));
        assert_eq!(d.len(), 2);
        for i in 0..100 {
            d.put(q("c"), true, t0 + Duration::from_millis(1000 + i));
        }
        assert!(d.order.len() <= 4);
        assert_eq!(d.get(&q("b"), t0), Some(false));
        assert_eq!(d.get(&q("a"), t0), None);
        assert_eq!(d.get(&q("c"), t0 + Duration::from_secs(1)), Some(true));
    }
}
