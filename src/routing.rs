//! Routing: MQTT topic filters and output topic templates, parsed once when the
//! configuration is read, pure functions with no I/O.
//!
//! Output topics are built only from the route's template and the *input topic's*
//! levels (which MQTT forbids to hold wildcards); nothing in a payload can steer
//! where a result is published.

/// A subscription filter, with its optional shared-subscription group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// What is sent in SUBSCRIBE (`$share/GROUP/…` included).
    subscription: String,
    /// The levels matched against incoming topics (the part after the group).
    levels: Vec<String>,
}

impl Filter {
    pub fn parse(filter: &str) -> Result<Filter, String> {
        let matched = match filter.strip_prefix("$share/") {
            Some(rest) => {
                let (group, f) = rest
                    .split_once('/')
                    .ok_or("a shared subscription is `$share/GROUP/filter`")?;
                if group.is_empty() || group.contains(['+', '#']) {
                    return Err("the shared subscription group must be a plain name".into());
                }
                f
            }
            None => filter,
        };
        if matched.is_empty() {
            return Err("the topic filter is empty".into());
        }
        let levels: Vec<String> = matched.split('/').map(String::from).collect();
        for (i, level) in levels.iter().enumerate() {
            let wildcard = level == "+" || level == "#";
            if !wildcard && level.contains(['+', '#']) {
                return Err(format!("`{level}`: a wildcard must fill a whole level"));
            }
            if level == "#" && i != levels.len() - 1 {
                return Err("`#` must be the last level".into());
            }
        }
        Ok(Filter {
            subscription: filter.to_string(),
            levels,
        })
    }

    /// What is sent in SUBSCRIBE (`$share/GROUP/…` included).
    pub fn subscription(&self) -> &str {
        &self.subscription
    }

    /// The levels captured by `+` and `#` if `topic` matches, in order; `#`
    /// captures the rest of the topic as one string.
    pub fn captures(&self, topic: &str) -> Option<Vec<String>> {
        let parts: Vec<&str> = topic.split('/').collect();
        // `$SYS/…` and other `$` topics are never matched by a leading wildcard.
        if topic.starts_with('$') && matches!(self.levels[0].as_str(), "+" | "#") {
            return None;
        }
        let mut captures = Vec::new();
        for (i, level) in self.levels.iter().enumerate() {
            match level.as_str() {
                "#" => {
                    captures.push(parts.get(i..).map(|p| p.join("/")).unwrap_or_default());
                    return Some(captures);
                }
                "+" => captures.push(parts.get(i)?.to_string()),
                exact => {
                    if parts.get(i) != Some(&exact) {
                        return None;
                    }
                }
            }
        }
        (parts.len() == self.levels.len()).then_some(captures)
    }
}

impl Filter {
    /// Whether `topic` is one this filter takes.
    pub fn matches(&self, topic: &str) -> bool {
        self.captures(topic).is_some()
    }
}

/// Whether `topic` can be published to: not empty, no wildcard, no NUL, not a
/// `$` topic, within MQTT's 65,535 bytes. A response topic comes from a request,
/// so it is checked before the daemon publishes to it: a broker disconnects a
/// client that publishes to a wildcard.
pub fn publishable(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 65_535
        && !topic.contains(['+', '#', '\0'])
        && !topic.starts_with('$')
}

/// An output or error topic template, checked: balanced braces, known
/// placeholders, no wildcards, no `$` start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(String);

impl Template {
    pub fn parse(template: &str) -> Result<Template, String> {
        if template.is_empty() {
            return Err("the topic template is empty".into());
        }
        if template.contains(['+', '#']) {
            return Err("a topic to publish to cannot hold `+` or `#`".into());
        }
        if template.starts_with('$') {
            return Err("`$` topics are reserved for the broker".into());
        }
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let close = rest[open..].find('}').ok_or("unclosed `{`")? + open;
            let name = &rest[open + 1..close];
            let known = matches!(name, "topic" | "model" | "name")
                || name.parse::<usize>().is_ok_and(|n| n >= 1);
            if !known {
                return Err(format!("unknown placeholder `{{{name}}}`: use {{topic}}, {{model}}, {{name}} or {{1}}, {{2}}…"));
            }
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err("unmatched `}`".into());
        }
        Ok(Template(template.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The topic for one input. A capture that does not exist becomes `_`.
    pub fn render(&self, topic: &str, captures: &[String], model: &str, name: &str) -> String {
        let mut out = String::with_capacity(self.0.len() + topic.len());
        let mut rest = self.0.as_str();
        // Parsing proved every `{` has its `}` and names a known placeholder.
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = rest[open..].find('}').map_or(rest.len(), |c| c + open);
            let key = &rest[open + 1..close.min(rest.len())];
            match key {
                "topic" => out.push_str(topic),
                "model" => out.push_str(model),
                "name" => out.push_str(name),
                n => match n
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| captures.get(i.wrapping_sub(1)))
                {
                    Some(c) if !c.is_empty() => out.push_str(c),
                    _ => out.push('_'),
                },
            }
            rest = rest.get(close + 1..).unwrap_or("");
        }
        out.push_str(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_and_capture() {
        let f = Filter::parse("sensors/+/text").unwrap();
        assert_eq!(f.captures("sensors/a1/text"), Some(vec!["a1".to_string()]));
        assert_eq!(f.captures("sensors/a1/other"), None);
        assert_eq!(f.captures("sensors/a1/text/x"), None);
        let f = Filter::parse("$share/g1/in/#").unwrap();
        assert_eq!(f.subscription(), "$share/g1/in/#");
        assert_eq!(f.captures("in/a/b"), Some(vec!["a/b".to_string()]));
        assert_eq!(f.captures("in"), Some(vec!["".to_string()]));
        assert_eq!(
            Filter::parse("#").unwrap().captures("$SYS/broker/uptime"),
            None
        );
    }

    #[test]
    fn response_topics_must_be_publishable() {
        let allowed = Filter::parse("anotador/reply/#").unwrap();
        assert!(allowed.matches("anotador/reply/ask-1") && publishable("anotador/reply/ask-1"));
        assert!(!allowed.matches("anotador/out/x"));
        for bad in ["", "anotador/reply/+", "anotador/reply/#", "$SYS/x", "a\0b"] {
            assert!(!publishable(bad), "{bad:?}");
        }
    }

    #[test]
    fn bad_filters_are_refused() {
        for bad in ["", "a/#/b", "a/b+", "$share/x", "$share//a", "$share/+/a"] {
            assert!(Filter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates_render_only_from_topic_levels() {
        Template::parse("out/{model}/{1}").unwrap();
        for bad in [
            "out/+",
            "out/#",
            "$SYS/x",
            "out/{text}",
            "out/{0}",
            "out/{1",
            "out/}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
        let c = vec!["dev-7".to_string()];
        let render = |t: &str| {
            Template::parse(t)
                .unwrap()
                .render("in/dev-7", &c, "ner", "a")
        };
        assert_eq!(render("out/{model}/{1}"), "out/ner/dev-7");
        assert_eq!(render("out/{2}/{name}"), "out/_/a");
        assert_eq!(render("{topic}/ner"), "in/dev-7/ner");
    }
}
