//! A strict parser of the Prometheus text exposition format (version 0.0.4), for tests.
//!
//! Stricter than Prometheus itself, so a test fails on anything a scraper might stumble on:
//! every sample belongs to the family whose `# HELP` and `# TYPE` came just before it (and only
//! with the suffixes its type allows), names and label names are valid, label values use only
//! the three escapes, values are numbers, no series appears twice, no line is blank, the text
//! ends with a newline, and every histogram has increasing bounds ending at `+Inf` with
//! cumulative counts whose last equals `_count`.

use std::collections::{BTreeMap, HashSet};

/// A metric family: its `# TYPE` and `# HELP`.
#[derive(Debug, Clone, PartialEq)]
pub struct FamilyInfo {
    /// counter, gauge, histogram, summary or untyped.
    pub kind: String,
    /// The help text, unescaped.
    pub help: String,
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name (with `_total`, `_bucket`, ... as written).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// Families by name.
    pub families: BTreeMap<String, FamilyInfo>,
    /// Samples in order.
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the sample `name` whose labels are exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }

    /// Every sample named `name`.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The `le` bounds of the histogram series `family` whose other labels are `labels`.
    pub fn bucket_bounds(&self, family: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        let bucket = format!("{family}_bucket");
        self.named(&bucket)
            .filter(|s| {
                s.labels.len() == labels.len() + 1
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| parse_value(&s.labels["le"]).expect("checked when parsed"))
            .collect()
    }
}

/// Parses `text`, or says which line breaks which rule.
pub fn parse(text: &str) -> Result<Exposition, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the exposition does not end with a newline".into());
    }
    let mut exposition = Exposition::default();
    let mut current: Option<String> = None;
    let mut pending_help: Option<(String, String)> = None;
    let mut series = HashSet::new();
    for (index, line) in text.lines().enumerate() {
        let at = |message: String| format!("line {}: {message}: {line:?}", index + 1);
        if line.is_empty() {
            return Err(at("blank line".into()));
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            check_metric_name(name).map_err(at)?;
            if exposition.families.contains_key(name) || pending_help.is_some() {
                return Err(at("HELP repeated or not followed by its TYPE".into()));
            }
            pending_help = Some((name.to_owned(), unescape_help(help).map_err(at)?));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| at("TYPE without a type".into()))?;
            check_metric_name(name).map_err(at)?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at(format!("unknown type '{kind}'")));
            }
            let help = match pending_help.take() {
                Some((help_name, help)) if help_name == name => help,
                _ => return Err(at("TYPE not preceded by the HELP of the same name".into())),
            };
            if exposition.families.contains_key(name) {
                return Err(at("family declared twice".into()));
            }
            exposition.families.insert(
                name.to_owned(),
                FamilyInfo {
                    kind: kind.to_owned(),
                    help,
                },
            );
            current = Some(name.to_owned());
            continue;
        }
        if line.starts_with('#') {
            return Err(at("a comment that is neither HELP nor TYPE".into()));
        }
        if pending_help.is_some() {
            return Err(at("a sample between a HELP and its TYPE".into()));
        }
        let sample = parse_sample(line).map_err(at)?;
        let family = current
            .as_deref()
            .ok_or_else(|| at("a sample before any TYPE".into()))?;
        let kind = exposition.families[family].kind.as_str();
        let suffix = sample
            .name
            .strip_prefix(family)
            .ok_or_else(|| at(format!("sample outside its family '{family}'")))?;
        let allowed: &[&str] = match kind {
            "histogram" => &["_bucket", "_sum", "_count"],
            "summary" => &["", "_sum", "_count"],
            _ => &[""],
        };
        if !allowed.contains(&suffix) {
            return Err(at(format!("suffix '{suffix}' is not allowed for a {kind}")));
        }
        if (suffix == "_bucket") != sample.labels.contains_key("le") {
            return Err(at("le belongs on buckets and only there".into()));
        }
        if kind == "counter" && (sample.value.is_nan() || sample.value < 0.0) {
            return Err(at("a counter below zero".into()));
        }
        let key = format!("{}{:?}", sample.name, sample.labels);
        if !series.insert(key) {
            return Err(at("series repeated".into()));
        }
        exposition.samples.push(sample);
    }
    if pending_help.is_some() {
        return Err("a HELP without its TYPE at the end".into());
    }
    check_histograms(&exposition)?;
    Ok(exposition)
}

fn check_histograms(exposition: &Exposition) -> Result<(), String> {
    for (family, info) in &exposition.families {
        if info.kind != "histogram" {
            continue;
        }
        // Buckets per label set without `le`, in the order written.
        let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        let bucket_name = format!("{family}_bucket");
        for sample in exposition.named(&bucket_name) {
            let mut labels = sample.labels.clone();
            let le = labels.remove("le").unwrap_or_default();
            let bound = parse_value(&le).map_err(|e| format!("{family}: le {e}"))?;
            buckets
                .entry(format!("{labels:?}"))
                .or_default()
                .push((bound, sample.value));
        }
        for sample in exposition.named(&format!("{family}_count")) {
            let key = format!("{:?}", sample.labels);
            let series = buckets
                .get(&key)
                .ok_or_else(|| format!("{family}{key}: a count without buckets"))?;
            for pair in series.windows(2) {
                if pair[0].0 >= pair[1].0 || pair[0].1 > pair[1].1 {
                    return Err(format!(
                        "{family}{key}: bounds must increase and counts accumulate"
                    ));
                }
            }
            match series.last() {
                Some((bound, count)) if bound.is_infinite() && *count == sample.value => {}
                _ => {
                    return Err(format!(
                        "{family}{key}: the last bucket must be +Inf and equal _count"
                    ));
                }
            }
        }
        let counts = exposition.named(&format!("{family}_count")).count();
        let sums = exposition.named(&format!("{family}_sum")).count();
        if counts != buckets.len() || sums != buckets.len() {
            return Err(format!(
                "{family}: each series needs one _sum and one _count"
            ));
        }
    }
    Ok(())
}

fn check_metric_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("invalid metric name '{name}'"))
    }
}

fn check_label_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') && !name.starts_with("__") {
        Ok(())
    } else {
        Err(format!("invalid label name '{name}'"))
    }
}

fn unescape_help(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                other => return Err(format!("bad escape in HELP: {other:?}")),
            },
            c => out.push(c),
        }
    }
    Ok(out)
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => {
            let ok = !text.is_empty()
                && text
                    .chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'));
            if !ok {
                return Err(format!("'{text}' is not a number"));
            }
            text.parse::<f64>()
                .map_err(|error| format!("'{text}' is not a number: {error}"))
        }
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| "a sample without a value".to_owned())?;
    let name = &line[..name_end];
    check_metric_name(name)?;
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let mut end = None;
        loop {
            match chars.peek() {
                Some((index, '}')) => {
                    end = Some(*index);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut label = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                label.push(c);
            }
            check_label_name(&label)?;
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label '{label}' value is not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("bad escape in label '{label}': {other:?}")),
                    },
                    Some('\n') | None => return Err(format!("label '{label}' is not closed")),
                    Some(c) => value.push(c),
                }
            }
            if labels.insert(label.clone(), value).is_some() {
                return Err(format!("label '{label}' repeated"));
            }
            match chars.peek().map(|(_, c)| *c) {
                Some(',') => {
                    chars.next();
                    if chars.peek().map(|(_, c)| *c) == Some('}') {
                        return Err("a trailing comma in the labels".into());
                    }
                }
                Some('}') => {}
                _ => return Err("labels must be separated by commas".into()),
            }
        }
        let end = end.ok_or_else(|| "labels are not closed".to_owned())?;
        if labels.is_empty() {
            return Err("empty braces".into());
        }
        rest = &after[end + 1..];
    }
    let value = rest
        .strip_prefix(' ')
        .ok_or_else(|| "one space must separate the series and its value".to_owned())?;
    if value.contains(' ') {
        return Err("a timestamp or trailing text after the value".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value: parse_value(value)?,
    })
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn the_parser_refuses_what_a_scraper_would() {
        let good = "# HELP a_total Things.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n";
        assert!(parse(good).is_ok());
        for bad in [
            "a_total 3\n",                                   // no TYPE
            "# HELP a A.\n# TYPE a gauge\na 1\na 2\n",       // repeated series
            "# HELP a A.\n# TYPE a gauge\nb 1\n",            // outside its family
            "# HELP a A.\n# TYPE a gauge\na{x=\"1} 1\n",     // unclosed value
            "# HELP a A.\n# TYPE a gauge\na{x=\"\\q\"} 1\n", // bad escape
            "# HELP a A.\n# TYPE a gauge\na one\n",          // not a number
            "# HELP a A.\n# TYPE a gauge\na 1",              // no final newline
            "# HELP a A.\n# TYPE a gauge\n\na 1\n",          // blank line
            "# HELP a A.\n# TYPE a gauge\na{x=\"1\",} 1\n",  // trailing comma
            "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", // not cumulative
            "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", // no +Inf
        ] {
            assert!(parse(bad).is_err(), "accepted: {bad:?}");
        }
    }
}
