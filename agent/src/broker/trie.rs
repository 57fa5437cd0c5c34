//! Subscriptions indexed by topic level, so routing a message costs the depth of its topic
//! rather than the number of subscriptions (a fleet has one or more per device).

use std::collections::HashMap;
use std::sync::Arc;

use rumqttc::QoS;

/// One subscription: which session, at which maximum QoS.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub client: Arc<str>,
    pub qos: QoS,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    subscribers: Vec<Subscriber>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty()
    }
}

/// Topic filters (with `+` and `#`) to subscribers.
#[derive(Debug, Default)]
pub struct Trie {
    root: Node,
}

impl Trie {
    /// Adds or replaces (same client, same filter) a subscription.
    pub fn insert(&mut self, filter: &str, client: &Arc<str>, qos: QoS) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        match node.subscribers.iter_mut().find(|s| s.client == *client) {
            Some(s) => s.qos = qos,
            None => node.subscribers.push(Subscriber {
                client: client.clone(),
                qos,
            }),
        }
    }

    /// Removes a client's subscription to `filter`, pruning empty branches.
    pub fn remove(&mut self, filter: &str, client: &str) {
        fn walk<'a>(node: &mut Node, mut levels: impl Iterator<Item = &'a str>, client: &str) {
            match levels.next() {
                None => node.subscribers.retain(|s| &*s.client != client),
                Some(level) => {
                    if let Some(child) = node.children.get_mut(level) {
                        walk(child, levels, client);
                        if child.is_empty() {
                            node.children.remove(level);
                        }
                    }
                }
            }
        }
        walk(&mut self.root, filter.split('/'), client);
    }

    /// Calls `f` for every subscription matching `topic` (a client with several matching
    /// filters is reported once per filter). Wildcards at the first level do not match
    /// topics starting with `$` (MQTT 3.1.1, 4.7.2).
    pub fn matches(&self, topic: &str, mut f: impl FnMut(&Subscriber)) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        Self::walk(&self.root, &levels, dollar, &mut f);
    }

    fn walk(node: &Node, levels: &[&str], first_is_dollar: bool, f: &mut impl FnMut(&Subscriber)) {
        let wildcards = !first_is_dollar;
        if wildcards {
            // `#` matches this level and everything below, including the parent itself
            // ("a/#" matches "a").
            if let Some(hash) = node.children.get("#") {
                hash.subscribers.iter().for_each(&mut *f);
            }
        }
        let Some((level, rest)) = levels.split_first() else {
            node.subscribers.iter().for_each(f);
            return;
        };
        if wildcards && let Some(plus) = node.children.get("+") {
            Self::walk(plus, rest, false, f);
        }
        if let Some(child) = node.children.get(*level) {
            Self::walk(child, rest, false, f);
        }
    }
}

/// Whether `topic` matches `filter`, with the same rules as [`Trie::matches`] (used for
/// retained messages, checked once per subscription).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(t) if f == "+" || f == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matching(trie: &Trie, topic: &str) -> Vec<String> {
        let mut out = Vec::new();
        trie.matches(topic, |s| out.push(s.client.to_string()));
        out.sort();
        out
    }

    #[test]
    fn exact_plus_and_hash() {
        let mut t = Trie::default();
        let (a, b, c, d) = (
            Arc::from("a"),
            Arc::from("b"),
            Arc::from("c"),
            Arc::from("d"),
        );
        t.insert("factory/m1/state", &a, QoS::AtLeastOnce);
        t.insert("factory/+/state", &b, QoS::AtLeastOnce);
        t.insert("factory/#", &c, QoS::AtMostOnce);
        t.insert("#", &d, QoS::AtMostOnce);
        assert_eq!(matching(&t, "factory/m1/state"), ["a", "b", "c", "d"]);
        assert_eq!(matching(&t, "factory/m2/state"), ["b", "c", "d"]);
        assert_eq!(matching(&t, "factory"), ["c", "d"]);
        assert_eq!(matching(&t, "factory/m1/state/x"), ["c", "d"]);
        assert_eq!(matching(&t, "other"), ["d"]);
        // "+" matches exactly one level, an empty one included.
        assert_eq!(matching(&t, "factory//state"), ["b", "c", "d"]);
    }

    #[test]
    fn dollar_topics_need_an_explicit_first_level() {
        let mut t = Trie::default();
        let (a, b, c) = (Arc::from("a"), Arc::from("b"), Arc::from("c"));
        t.insert("#", &a, QoS::AtMostOnce);
        t.insert("+/x", &b, QoS::AtMostOnce);
        t.insert("$SYS/#", &c, QoS::AtMostOnce);
        assert_eq!(matching(&t, "$SYS/x"), ["c"]);
        assert_eq!(matching(&t, "y/x"), ["a", "b"]);
    }

    #[test]
    fn replace_and_remove_prune() {
        let mut t = Trie::default();
        let a: Arc<str> = Arc::from("a");
        t.insert("x/+/y", &a, QoS::AtMostOnce);
        t.insert("x/+/y", &a, QoS::AtLeastOnce);
        let mut qos = Vec::new();
        t.matches("x/1/y", |s| qos.push(s.qos));
        assert_eq!(qos, [QoS::AtLeastOnce]);
        t.remove("x/+/y", "a");
        assert!(matching(&t, "x/1/y").is_empty());
        assert!(t.root.is_empty(), "empty branches are pruned");
    }

    #[test]
    fn single_filter_agrees_with_the_trie() {
        let filters = ["a/b", "a/+", "a/#", "#", "+/+", "$SYS/#", "+/b/#", "a/b/c"];
        let topics = ["a/b", "a", "a/b/c", "$SYS/x", "x/b", "a//b", "b"];
        for filter in filters {
            let mut t = Trie::default();
            t.insert(filter, &Arc::from("c"), QoS::AtMostOnce);
            for topic in topics {
                let in_trie = !matching(&t, topic).is_empty();
                assert_eq!(
                    filter_matches(filter, topic),
                    in_trie,
                    "{filter} vs {topic}"
                );
            }
        }
    }
}
