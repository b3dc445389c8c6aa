//! Label selectors (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`, `k>1`,
//! `k<1`; comma = AND) and field selectors (`f=v`, `f==v`, `f!=v`), parsed and matched as the
//! real API server (apimachinery `labels.Parse`, `fields.ParseSelector`) does.

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `k=v`, `k==v`, `k in (a,b)`: the label is present with one of the values.
    In(String, Vec<String>),
    /// `k!=v`, `k notin (a,b)`: the label is absent or has none of the values.
    NotIn(String, Vec<String>),
    /// `k`
    Exists(String),
    /// `!k`
    DoesNotExist(String),
    /// `k>n`: present, an integer, greater than n.
    Gt(String, i64),
    /// `k<n`
    Lt(String, i64),
}

/// A parsed label selector: every requirement must hold. Empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<Requirement>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<LabelSelector, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(text)? {
            let part = part.trim();
            if part.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err(format!(
                    "unable to parse requirement: found '', expected: identifier in {text:?}"
                ));
            }
            requirements.push(parse_requirement(part)?);
        }
        Ok(LabelSelector(requirements))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let get = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::In(k, values) => get(k).is_some_and(|v| values.iter().any(|x| x == v)),
            Requirement::NotIn(k, values) => get(k).is_none_or(|v| values.iter().all(|x| x != v)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::DoesNotExist(k) => get(k).is_none(),
            Requirement::Gt(k, n) => get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v > *n),
            Requirement::Lt(k, n) => get(k)
                .and_then(|v| v.parse::<i64>().ok())
                .is_some_and(|v| v < *n),
        })
    }
}

/// Splits at commas outside parentheses.
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth.checked_sub(1).ok_or_else(|| {
                    format!("unable to parse requirement: unexpected ')' in {text:?}")
                })?
            }
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!(
            "unable to parse requirement: found '', expected: ')' in {text:?}"
        ));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    if let Some(rest) = part.strip_prefix('!') {
        let key = rest.trim();
        validate_key(key)?;
        return Ok(Requirement::DoesNotExist(key.to_owned()));
    }
    let key_end = part.find(|c: char| !is_key_char(c)).unwrap_or(part.len());
    let key = &part[..key_end];
    validate_key(key)?;
    let rest = part[key_end..].trim_start();
    let key = key.to_owned();
    if rest.is_empty() {
        return Ok(Requirement::Exists(key));
    }
    for (op, negate) in [("==", false), ("!=", true), ("=", false)] {
        if let Some(value) = rest.strip_prefix(op) {
            let value = value.trim();
            validate_value(value)?;
            let values = vec![value.to_owned()];
            return Ok(if negate {
                Requirement::NotIn(key, values)
            } else {
                Requirement::In(key, values)
            });
        }
    }
    for (op, gt) in [(">", true), ("<", false)] {
        if let Some(value) = rest.strip_prefix(op) {
            let n: i64 = value.trim().parse().map_err(|_| {
                format!(
                    "unable to parse requirement: for 'Gt', 'Lt' operators, the value must be an \
                     integer, got {:?}",
                    value.trim()
                )
            })?;
            return Ok(if gt {
                Requirement::Gt(key, n)
            } else {
                Requirement::Lt(key, n)
            });
        }
    }
    for (op, negate) in [("notin", true), ("in", false)] {
        if let Some(set) = rest.strip_prefix(op)
            && (set.starts_with('(') || set.starts_with(char::is_whitespace))
        {
            let values = parse_set(set.trim())?;
            return Ok(if negate {
                Requirement::NotIn(key, values)
            } else {
                Requirement::In(key, values)
            });
        }
    }
    Err(format!(
        "unable to parse requirement: found '{rest}', expected: in, notin, =, ==, !=, gt, lt"
    ))
}

fn parse_set(set: &str) -> Result<Vec<String>, String> {
    let inner = set
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("unable to parse requirement: found '{set}', expected: '('"))?;
    let mut values = Vec::new();
    for v in inner.split(',') {
        let v = v.trim();
        validate_value(v)?;
        values.push(v.to_owned());
    }
    Ok(values)
}

/// A label key: optional DNS-subdomain prefix and `/`, then a name of at most 63 characters
/// of `[A-Za-z0-9._-]` starting and ending alphanumeric.
fn validate_key(key: &str) -> Result<(), String> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty()
                || prefix.len() > 253
                || !prefix
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            {
                return Err(format!(
                    "unable to parse requirement: invalid label key {key:?}: prefix part must \
                     be a DNS-1123 subdomain"
                ));
            }
            name
        }
        None => key,
    };
    if !valid_name_part(name) {
        return Err(format!(
            "unable to parse requirement: invalid label key {key:?}: name part must consist of \
             alphanumeric characters, '-', '_' or '.', and must start and end with an \
             alphanumeric character"
        ));
    }
    Ok(())
}

fn valid_name_part(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn validate_value(value: &str) -> Result<(), String> {
    if value.is_empty() || valid_name_part(value) {
        Ok(())
    } else {
        Err(format!(
            "unable to parse requirement: invalid label value: {value:?}: a valid label must be \
             an empty string or consist of alphanumeric characters, '-', '_' or '.', and must \
             start and end with an alphanumeric character"
        ))
    }
}

/// A parsed field selector: every term must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<FieldTerm>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldTerm {
    pub field: String,
    pub value: String,
    pub negate: bool,
}

impl FieldSelector {
    /// Parses `text`, accepting only the fields in `supported`.
    pub fn parse(text: &str, supported: &[&str]) -> Result<FieldSelector, String> {
        let mut terms = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (field, value, negate) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, false)
            } else {
                return Err(format!(
                    "invalid selector: '{text}'; can't understand '{part}'"
                ));
            };
            let field = field.trim();
            if !supported.contains(&field) {
                let list = supported
                    .iter()
                    .map(|f| format!("{f:?}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(format!(
                    "{field:?} is not a known field selector: only {list}"
                ));
            }
            terms.push(FieldTerm {
                field: field.to_owned(),
                value: value.trim().to_owned(),
                negate,
            });
        }
        Ok(FieldSelector(terms))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0
            .iter()
            .all(|t| (field_value(object, &t.field) == t.value) != t.negate)
    }
}

/// The value a field selector compares: strings as they are, booleans as `true`/`false`,
/// absent fields as `""` (and `spec.unschedulable` as `false`, its default).
fn field_value(object: &Value, field: &str) -> String {
    let pointer = format!("/{}", field.replace('.', "/"));
    match object.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ if field == "spec.unschedulable" => "false".to_owned(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns1", "labels": labels}})
    }

    #[test]
    fn each_form_parses_and_matches() {
        let o = obj(json!({"app": "web", "tier": "front", "n": "5"}));
        let empty = obj(json!({}));
        let cases: &[(&str, bool, bool)] = &[
            ("app=web", true, false),
            ("app==web", true, false),
            ("app=db", false, false),
            ("app!=db", true, true),
            ("app!=web", false, true),
            ("app", true, false),
            ("!app", false, true),
            ("app in (web,db)", true, false),
            ("app in (db, cache)", false, false),
            ("app notin (db,cache)", true, true),
            ("app notin (web)", false, true),
            ("app=web,tier=front", true, false),
            ("app=web,tier=back", false, false),
            ("app in (web,db),!missing", true, false),
            ("n>4", true, false),
            ("n<4", false, false),
            ("", true, true),
        ];
        for (text, on_o, on_empty) in cases {
            let s = LabelSelector::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(s.matches(&o), *on_o, "{text} on {o}");
            assert_eq!(s.matches(&empty), *on_empty, "{text} on no labels");
        }
    }

    #[test]
    fn prefixed_keys_and_structure() {
        let s = LabelSelector::parse(
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
        )
        .unwrap();
        assert_eq!(
            s.0,
            vec![
                Requirement::DoesNotExist("service.kubernetes.io/service-proxy-name".into()),
                Requirement::DoesNotExist("service.kubernetes.io/headless".into()),
            ]
        );
        assert!(s.matches(&obj(json!({"app": "x"}))));
        assert!(!s.matches(&obj(json!({"service.kubernetes.io/headless": ""}))));
        let s = LabelSelector::parse("kubernetes.io/service-name in (a, b)").unwrap();
        assert_eq!(
            s.0,
            vec![Requirement::In(
                "kubernetes.io/service-name".into(),
                vec!["a".into(), "b".into()]
            )]
        );
    }

    #[test]
    fn malformed_selectors_are_rejected() {
        for text in [
            "app in (a,b",
            "app in a,b)",
            "app=web,",
            "app==",
            "-app=x",
            "app=we b",
            "app>x",
            "app ~ x",
            "Bad_Prefix/x=y",
        ] {
            if text == "app==" {
                // An empty value is valid: `app==` selects app="".
                assert!(LabelSelector::parse(text).is_ok());
                continue;
            }
            assert!(LabelSelector::parse(text).is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn field_selectors() {
        let fields = ["metadata.name", "metadata.namespace", "spec.unschedulable"];
        let o = json!({"metadata": {"name": "a", "namespace": "ns1"}, "spec": {}});
        let yes = |t: &str| FieldSelector::parse(t, &fields).unwrap().matches(&o);
        assert!(yes("metadata.name=a"));
        assert!(yes("metadata.name==a"));
        assert!(!yes("metadata.name!=a"));
        assert!(yes("metadata.name=a,metadata.namespace=ns1"));
        assert!(!yes("metadata.name=a,metadata.namespace=ns2"));
        assert!(yes("spec.unschedulable=false"));
        let err = FieldSelector::parse("spec.foo=x", &fields).unwrap_err();
        assert!(
            err.contains("\"spec.foo\" is not a known field selector"),
            "{err}"
        );
        assert!(FieldSelector::parse("metadata.name", &fields).is_err());
    }
}
