//! An analysis's figures from Prometheus: the agents' request counters and latency buckets
//! over the last interval, summed across every node, as a `Window` for `rollout::analysis::judge`
//! (the verdict is computed there, not in PromQL).

use std::{collections::BTreeSet, time::Duration};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::{
    client::{self, url_encode},
    rollout::{
        Traffic, Window,
        local::{Subject, Totals},
    },
};

/// A query that takes longer holds the step, like any other Prometheus error.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A Prometheus server's HTTP API (`http://host:port`, optionally with a path prefix).
#[derive(Clone, Debug)]
pub struct Prometheus {
    /// `host:port`.
    authority: String,
    /// The path prefix, without the trailing slash.
    prefix: String,
}

impl Prometheus {
    pub fn new(url: &str) -> Result<Prometheus> {
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("--prometheus-url `{url}` is not a URL"))?;
        if uri.scheme_str() != Some("http") {
            bail!("--prometheus-url `{url}`: only http:// is supported");
        }
        let authority = uri
            .authority()
            .with_context(|| format!("--prometheus-url `{url}` has no host"))?;
        Ok(Prometheus {
            authority: format!(
                "{}:{}",
                authority.host(),
                authority.port_u16().unwrap_or(80)
            ),
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }

    /// The figures of `subject` over the `over` before `at`: the release's own requests to its
    /// versions, and every request to the primaries of the same services.
    pub async fn window(
        &self,
        subject: &Subject,
        over: Duration,
        at: jiff::Timestamp,
    ) -> Result<Window> {
        let (requests, buckets) = queries(subject, over);
        let requests = self.query(&requests, at).await?;
        let buckets = self.query(&buckets, at).await?;
        Ok(subject.window(&totals(&requests, &buckets)?))
    }

    /// An instant query's answer, as Prometheus gives it.
    async fn query(&self, promql: &str, at: jiff::Timestamp) -> Result<String> {
        let path = format!(
            "{}/api/v1/query?query={}&time={}",
            self.prefix,
            url_encode(promql),
            at.as_second()
        );
        tokio::time::timeout(QUERY_TIMEOUT, self.get(&path))
            .await
            .with_context(|| {
                format!(
                    "no answer from Prometheus at {} in {QUERY_TIMEOUT:?}",
                    self.authority
                )
            })?
    }

    async fn get(&self, path: &str) -> Result<String> {
        let (status, text) =
            client::request("Prometheus", &self.authority, http::Method::GET, path, &[]).await?;
        // Query errors come as 400/422 with `{"status":"error","error":...}`: read below.
        if !status.is_success() && !text.starts_with('{') {
            bail!("Prometheus answered {status}: {text}");
        }
        Ok(text)
    }
}

/// The two queries of an analysis: requests by status class, and latency buckets, per
/// (service, version, release) of the subject's versions over the last `over`. The regular
/// expressions select a superset; `Subject::window` keeps the exact (service, version) pairs.
pub fn queries(subject: &Subject, over: Duration) -> (String, String) {
    let pairs = subject.canary.iter().chain(&subject.primaries);
    let services: BTreeSet<&str> = pairs.clone().map(|(s, _)| s.as_str()).collect();
    let versions: BTreeSet<&str> = pairs.map(|(_, v)| v.as_str()).collect();
    let selector = format!(
        "service=~\"{}\",version=~\"{}\"",
        alternatives(&services),
        alternatives(&versions)
    );
    // Whole seconds, at least one: a range selector takes no fractions.
    let range = over.as_secs_f64().ceil().max(1.0) as u64;
    (
        format!(
            "sum by (service, version, release, code) \
             (increase(steer_requests_total{{{selector}}}[{range}s]))"
        ),
        format!(
            "sum by (service, version, release, le) \
             (increase(steer_request_duration_seconds_bucket{{{selector}}}[{range}s]))"
        ),
    )
}

/// `a|b\.c`, escaped for a regular expression inside a PromQL string.
fn alternatives(names: &BTreeSet<&str>) -> String {
    names
        .iter()
        .map(|name| {
            regex::escape(name)
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
        })
        .collect::<Vec<_>>()
        .join("|")
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<Data>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Data {
    result_type: String,
    result: Vec<Sample>,
}

#[derive(Deserialize)]
struct Sample {
    metric: std::collections::BTreeMap<String, String>,
    /// (time, value as text).
    value: (f64, String),
}

/// The samples of an instant query's vector answer.
fn samples(answer: &str) -> Result<Vec<Sample>> {
    let answer: Answer = serde_json::from_str(answer)
        .with_context(|| format!("Prometheus's answer is not its API's JSON: {answer:.200}"))?;
    if answer.status != "success" {
        bail!(
            "Prometheus: {}",
            answer.error.as_deref().unwrap_or("the query failed")
        );
    }
    let data = answer.data.context("Prometheus's answer has no data")?;
    if data.result_type != "vector" {
        bail!("Prometheus answered a {}, not a vector", data.result_type);
    }
    Ok(data.result)
}

/// The figures of the two answers by (service, version, release). Increases are extrapolated
/// (fractions): each is rounded to whole requests.
pub fn totals(requests: &str, buckets: &str) -> Result<Totals> {
    let mut totals = Totals::new();
    let key = |sample: &Sample| {
        let label = |name: &str| sample.metric.get(name).cloned().unwrap_or_default();
        (label("service"), label("version"), label("release"))
    };
    let count = |sample: &Sample| {
        sample
            .value
            .1
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v > 0.0)
            .map_or(0, |v| v.round() as u64)
    };
    for sample in samples(requests)? {
        let traffic: &mut Traffic = totals.entry(key(&sample)).or_default();
        let n = count(&sample);
        traffic.requests += n;
        if sample.metric.get("code").map(String::as_str) == Some("5xx") {
            traffic.errors += n;
        }
    }
    for sample in samples(buckets)? {
        let bound = match sample.metric.get("le").map(String::as_str) {
            Some("+Inf") => f64::INFINITY,
            Some(bound) => bound
                .parse()
                .with_context(|| format!("Prometheus: bucket bound `{bound}`"))?,
            None => continue,
        };
        let n = count(&sample);
        totals
            .entry(key(&sample))
            .or_default()
            .latency
            .push((bound, n));
    }
    for traffic in totals.values_mut() {
        traffic.latency.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> Subject {
        Subject {
            release: "food/red".into(),
            canary: vec![
                ("restaurant.food".into(), "v2".into()),
                ("delivery.food".into(), "v3".into()),
            ],
            primaries: vec![
                ("restaurant.food".into(), "v1".into()),
                ("delivery.food".into(), "v1".into()),
            ],
        }
    }

    #[test]
    fn the_queries_select_the_subjects_versions_over_the_interval() {
        let (requests, buckets) = queries(&subject(), Duration::from_millis(2500));
        assert_eq!(
            requests,
            "sum by (service, version, release, code) (increase(steer_requests_total\
             {service=~\"delivery\\\\.food|restaurant\\\\.food\",version=~\"v1|v2|v3\"}[3s]))"
        );
        assert!(buckets.starts_with(
            "sum by (service, version, release, le) \
             (increase(steer_request_duration_seconds_bucket{"
        ));
        assert_eq!(url_encode("a b{c=\"d\"}"), "a%20b%7Bc%3D%22d%22%7D");
    }

    fn vector(samples: &[(&[(&str, &str)], &str)]) -> String {
        let result: Vec<serde_json::Value> = samples
            .iter()
            .map(|(labels, value)| {
                let metric: serde_json::Map<String, serde_json::Value> = labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
                    .collect();
                serde_json::json!({"metric": metric, "value": [1_800_000_000.5, value]})
            })
            .collect();
        serde_json::json!({"status": "success",
                           "data": {"resultType": "vector", "result": result}})
        .to_string()
    }

    #[test]
    fn answers_become_the_window_of_exactly_the_subjects_pairs() {
        let route = |s: &'static str, v: &'static str, r: &'static str| {
            [("service", s), ("version", v), ("release", r)]
        };
        let with = |route: [(&'static str, &'static str); 3],
                    extra: (&'static str, &'static str)| {
            let mut labels = route.to_vec();
            labels.push(extra);
            labels
        };
        let red_restaurant = route("restaurant.food", "v2", "food/red");
        let red_delivery = route("delivery.food", "v3", "food/red");
        let primary = route("restaurant.food", "v1", "");
        let primary_other = route("delivery.food", "v1", "food/blue");
        // In the regex's cross product but no pair of the subject's: left out.
        let stray = route("delivery.food", "v2", "food/red");
        let requests = [
            (with(red_restaurant, ("code", "2xx")), "95.4"),
            (with(red_restaurant, ("code", "5xx")), "2.6"),
            (with(red_delivery, ("code", "2xx")), "50"),
            (with(primary, ("code", "2xx")), "1000"),
            (with(primary_other, ("code", "4xx")), "10"),
            (with(stray, ("code", "5xx")), "500"),
        ];
        let requests: Vec<(&[(&str, &str)], &str)> =
            requests.iter().map(|(l, v)| (&l[..], *v)).collect();
        let buckets = [
            (with(red_restaurant, ("le", "0.1")), "90"),
            (with(red_restaurant, ("le", "+Inf")), "98"),
            (with(red_delivery, ("le", "0.1")), "50"),
            (with(red_delivery, ("le", "+Inf")), "50"),
            (with(primary, ("le", "0.1")), "1000"),
            (with(primary, ("le", "+Inf")), "1000"),
            (with(stray, ("le", "+Inf")), "NaN"),
        ];
        let buckets: Vec<(&[(&str, &str)], &str)> =
            buckets.iter().map(|(l, v)| (&l[..], *v)).collect();
        let figures = totals(&vector(&requests), &vector(&buckets)).unwrap();
        let window = subject().window(&figures);
        assert_eq!((window.canary.requests, window.canary.errors), (148, 3));
        assert_eq!(
            window.canary.latency,
            [(0.1, 140), (f64::INFINITY, 148)],
            "buckets of one bound add up across versions"
        );
        assert_eq!((window.primary.requests, window.primary.errors), (1010, 0));
        // An answer without samples (no traffic yet) is an empty window, not an error.
        let empty = totals(&vector(&[]), &vector(&[])).unwrap();
        assert_eq!(subject().window(&empty), Window::default());
    }

    #[test]
    fn errors_of_prometheus_are_errors() {
        let error = r#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#;
        let err = totals(error, error).unwrap_err();
        assert!(err.to_string().contains("parse error at char 5"), "{err}");
        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(totals(matrix, matrix).is_err());
        assert!(totals("<html>", "<html>").is_err());
        assert!(Prometheus::new("https://prometheus:9090").is_err());
        let prometheus = Prometheus::new("http://prometheus.monitoring:9090/prom/").unwrap();
        assert_eq!(prometheus.authority, "prometheus.monitoring:9090");
        assert_eq!(prometheus.prefix, "/prom");
    }
}
