//! The configuration model: services with their versions and endpoints, and canary releases.
//!
//! The YAML file format. Its matchers are also the Kubernetes resource's (`kubernetes::crd`), so
//! field names are camelCase and unknown fields are rejected: a typo must not silently drop a rule.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Everything the agent needs to route: the mesh services and the canary releases over them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub releases: Vec<Release>,
    /// How the gateway listener (north-south entry) picks the first service.
    #[serde(default, skip_serializing_if = "Gateway::is_empty")]
    pub gateway: Gateway,
    /// cgroups (v2) whose connections are never redirected to the proxy: a pod's cgroup
    /// covers its containers. Absolute, or relative to the cgroup the agent attaches to
    /// (`--cgroup`). A cgroup that does not exist when the configuration applies is skipped
    /// with a warning.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub opt_out_cgroups: Vec<PathBuf>,
    /// Response headers naming the service, version and release that served (for debugging).
    #[serde(default = "enabled", skip_serializing_if = "Clone::clone")]
    pub debug_headers: bool,
}

fn enabled() -> bool {
    true
}

/// Routes of the gateway listener: the first route whose host and path prefix match wins.
/// Without a matching route, a Host naming a service (by name) selects it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Gateway {
    #[serde(default)]
    pub routes: Vec<GatewayRoute>,
}

impl Gateway {
    fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayRoute {
    /// The Host header (without port); any host when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// A path prefix; any path when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    pub service: String,
}

/// A host as the gateway's routes and service names compare it: without its port or a
/// trailing dot; compared without ASCII case (`host_key` is the lower-cased form).
pub fn bare_host(authority: &str) -> &str {
    let host = match authority.rsplit_once(':') {
        // An IPv6 literal's colons are inside its brackets.
        Some((host, port)) if !port.contains(']') => host,
        _ => authority,
    };
    host.strip_suffix('.').unwrap_or(host)
}

/// `bare_host` in lower case: what two hosts that compare equal have in common.
pub fn host_key(authority: &str) -> String {
    bare_host(authority).to_ascii_lowercase()
}

/// A mesh service: the addresses callers connect to and the versions that serve it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    /// Where callers connect (the ClusterIP:port in Kubernetes).
    #[serde(default)]
    pub addresses: Vec<SocketAddr>,
    pub versions: Vec<Version>,
    /// How long a version has to answer with its response headers (e.g. `5s`, `1m30s`);
    /// [`DEFAULT_REQUEST_TIMEOUT`] when unset. Streaming bodies are not cut off by it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "timeout_format"
    )]
    pub request_timeout: Option<Duration>,
    /// What its clients speak. `tcp` for protocols the rules cannot read, above all those
    /// where the server speaks first (MySQL, SMTP): their connections go to the primary
    /// version at once, unread. Kubernetes: a Service port's `appProtocol`.
    #[serde(default, skip_serializing_if = "AppProtocol::is_http")]
    pub protocol: AppProtocol,
}

/// What a service's clients speak.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1 or HTTP/2 (h2c, gRPC): read, and routed by the rules. A client that sends
    /// something else is still relayed to the primary.
    #[default]
    Http,
    /// Anything else: relayed to the primary version without waiting for the client.
    Tcp,
}

impl AppProtocol {
    fn is_http(&self) -> bool {
        *self == AppProtocol::Http
    }

    /// A Kubernetes Service port's `appProtocol`: HTTP for the names of HTTP and its
    /// cleartext variants, TCP for every other name (mysql, redis, https, ...).
    pub fn from_kubernetes(app_protocol: Option<&str>) -> AppProtocol {
        const HTTP: [&str; 6] = [
            "http",
            "http2",
            "h2c",
            "grpc",
            "kubernetes.io/h2c",
            "kubernetes.io/ws",
        ];
        match app_protocol {
            Some(name) if !HTTP.contains(&name.to_ascii_lowercase().as_str()) => AppProtocol::Tcp,
            _ => AppProtocol::Http,
        }
    }
}

/// A service's request timeout when its configuration names none.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Durations as people write them (`250ms`, `5s`, `1m30s`); zero is refused, since it would
/// fail every request.
pub mod timeout_format {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn parse(text: &str) -> Result<Duration, String> {
        let duration: jiff::SignedDuration = text
            .parse()
            .map_err(|err| format!("`{text}` is not a duration such as 5s or 1m30s: {err}"))?;
        match Duration::try_from(duration) {
            Ok(duration) if !duration.is_zero() => Ok(duration),
            _ => Err(format!("`{text}`: a timeout must be more than zero")),
        }
    }

    /// `parse`, with the field named for the file format's errors.
    fn parse_field(text: &str) -> Result<Duration, String> {
        parse(text).map_err(|reason| format!("requestTimeout {reason}"))
    }

    pub fn serialize<S: Serializer>(
        timeout: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let text = timeout.map(|t| {
            format!(
                "{:#}",
                jiff::SignedDuration::try_from(t).unwrap_or_default()
            )
        });
        match text {
            Some(text) => serializer.serialize_str(&text),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| parse_field(&text).map_err(D::Error::custom))
            .transpose()
    }
}

/// One deployed version of a service and the endpoints (pod ip:port) that serve it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Version {
    pub name: String,
    /// Exactly one version of each service is primary: it takes all traffic no release claims.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub primary: bool,
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
}

/// A canary release: the traffic it takes (all matchers must hold) and, per service, the
/// version that serves that traffic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Release {
    pub name: String,
    /// Smaller number = higher priority: priority 1 beats priority 2.
    pub priority: u32,
    #[serde(rename = "match", default)]
    pub matchers: Vec<Matcher>,
    /// Optional share of the matching users, 0 < percent <= 100; needs `hashBy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// The header whose value keeps a user on the same side of `percent` (e.g. `x-user-id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_by: Option<String>,
    /// Service name -> the version of that service that belongs to this release.
    #[serde(default)]
    pub targets: BTreeMap<String, String>,
    /// Grow the release step by step on its own health instead of a fixed `percent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::rollout::Rollout>,
}

/// One condition on a request header. Exactly one of `exact`, `prefix`, `regex` is set;
/// with none of them the matcher is rejected by the checker (and, as a resource, by the API
/// server's validation rule).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.exact), has(self.prefix), has(self.regex)].filter(x, x).size() == 1",
    "message": "set exactly one of exact, prefix, regex"
}, {
    // Matching an invalid pattern is an evaluation error, which rejects the object; a valid
    // one makes the rule true whatever it matches.
    "rule": "!has(self.regex) || ''.matches(self.regex) || !''.matches(self.regex)",
    "message": "regex is not a valid regular expression"
}]))]
pub struct Matcher {
    /// The request header (case-insensitive).
    #[schemars(length(min = 1))]
    pub header: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Must match the whole header value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub regex: Option<String>,
}

/// A configuration file that could not be read or parsed (as opposed to one that parsed but
/// breaks a rule, which the checker reports).
#[derive(Debug)]
pub struct LoadError {
    pub path: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub reason: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(column)) => {
                write!(f, "{}:{line}:{column}: {}", self.path, self.reason)
            }
            _ => write!(f, "{}: {}", self.path, self.reason),
        }
    }
}

impl std::error::Error for LoadError {}

impl Default for Config {
    fn default() -> Self {
        Config {
            services: Vec::new(),
            releases: Vec::new(),
            gateway: Gateway::default(),
            opt_out_cgroups: Vec::new(),
            debug_headers: true,
        }
    }
}

impl Config {
    /// Parses YAML text; `origin` names the source in error messages. Input past the bounds
    /// below is refused before it is parsed (or used): parse time grows with nesting, and a
    /// name travels in every stamped request.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, LoadError> {
        let refuse = |reason: String| LoadError {
            path: origin.to_string(),
            line: None,
            column: None,
            reason,
        };
        if text.len() > MAX_CONFIG_BYTES {
            return Err(refuse(format!(
                "{} bytes; a configuration may have at most {MAX_CONFIG_BYTES}",
                text.len()
            )));
        }
        if let Some((line, column)) = nested_deeper_than(text, MAX_NESTING) {
            return Err(LoadError {
                line: Some(line),
                column: Some(column),
                ..refuse(format!("nested deeper than {MAX_NESTING} levels"))
            });
        }
        let config: Config = serde_yaml_ng::from_str(text).map_err(|err| {
            let location = err.location();
            LoadError {
                path: origin.to_string(),
                line: location.as_ref().map(|l| l.line()),
                column: location.as_ref().map(|l| l.column()),
                reason: strip_location(&err.to_string()),
            }
        })?;
        config.refuse_long_names().map_err(refuse)?;
        Ok(config)
    }

    /// Names are DNS-like and header names short: refuses the first that is not.
    fn refuse_long_names(&self) -> Result<(), String> {
        let check = |what: &dyn Fn() -> String, name: &str| {
            if name.len() > MAX_NAME_BYTES {
                return Err(format!(
                    "{}: {} bytes; at most {MAX_NAME_BYTES}",
                    what(),
                    name.len()
                ));
            }
            Ok(())
        };
        for service in &self.services {
            check(&|| "service name".into(), &service.name)?;
            for version in &service.versions {
                let what = || format!("service `{}` version name", service.name);
                check(&what, &version.name)?;
            }
        }
        for release in &self.releases {
            check(&|| "release name".into(), &release.name)?;
            for matcher in &release.matchers {
                let what = || format!("release `{}` matcher header", release.name);
                check(&what, &matcher.header)?;
            }
        }
        Ok(())
    }

    /// Reads and parses a YAML configuration file.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| LoadError {
            path: origin.clone(),
            line: None,
            column: None,
            reason: format!("cannot read: {err}"),
        })?;
        Config::from_yaml(&text, &origin)
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// The largest configuration file (or text) accepted.
pub const MAX_CONFIG_BYTES: usize = 8 << 20;
/// The deepest nesting of YAML collections accepted (a configuration needs about six).
pub const MAX_NESTING: usize = 64;
/// The longest service, version, release or header name accepted (a DNS name is at most 253).
pub const MAX_NAME_BYTES: usize = 253;

/// Where (line, column) flow collections (`[`, `{`) or block indentation first nest deeper
/// than `limit`, if they do. Counts brackets outside quoted scalars and comments, and block
/// levels by indentation; conservative rather than a parser.
fn nested_deeper_than(text: &str, limit: usize) -> Option<(usize, usize)> {
    let mut depth = 0usize;
    for (number, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches([' ', '-']).len();
        // Block collections nest by at least one column per level.
        if indent > limit * 2 {
            return Some((number + 1, indent + 1));
        }
        let mut quote: Option<char> = None;
        for (column, c) in line.chars().enumerate() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > limit {
                        return Some((number + 1, column + 1));
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    None
}

/// serde_yaml appends " at line L column C" to its messages; we print the location ourselves.
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(at) => message[..at].to_string(),
        None => message.to_string(),
    }
}

impl Service {
    pub fn primary(&self) -> Option<&Version> {
        self.versions.iter().find(|v| v.primary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_shape() {
        let config = Config::from_yaml(
            r#"
services:
  - name: restaurant
    addresses: ["10.96.0.20:80"]
    versions:
      - name: v1
        primary: true
        endpoints: ["10.244.1.5:8080"]
      - name: v2-android
        endpoints: ["10.244.1.6:8080"]
releases:
  - name: android
    priority: 2
    match:
      - header: x-device
        exact: android
    percent: 10
    hashBy: x-user-id
    targets:
      restaurant: v2-android
"#,
            "test.yaml",
        )
        .unwrap();
        let restaurant = config.service("restaurant").unwrap();
        assert_eq!(restaurant.primary().unwrap().name, "v1");
        let release = &config.releases[0];
        assert_eq!(release.percent, Some(10.0));
        assert_eq!(release.hash_by.as_deref(), Some("x-user-id"));
        assert_eq!(release.matchers[0].exact.as_deref(), Some("android"));
    }

    #[test]
    fn unknown_field_is_an_error_with_line_and_column() {
        let err = Config::from_yaml(
            "releases:\n  - name: a\n    priority: 1\n    prio: 2\n",
            "f.yaml",
        )
        .unwrap_err();
        assert_eq!(err.line, Some(4), "{err}");
        assert!(err.column.is_some());
        assert!(err.to_string().starts_with("f.yaml:4:"), "{err}");
        assert!(err.reason.contains("prio"), "{err}");
    }

    #[test]
    fn hosts_compare_without_port_trailing_dot_or_case() {
        for (authority, bare) in [
            ("shop.example", "shop.example"),
            ("Shop.Example.:8443", "Shop.Example"),
            ("10.0.0.1:80", "10.0.0.1"),
            ("[fd00::1]:80", "[fd00::1]"),
            ("[fd00::1]", "[fd00::1]"),
        ] {
            assert_eq!(bare_host(authority), bare, "{authority}");
        }
        assert_eq!(host_key("Shop.Example."), "shop.example");
    }

    #[test]
    fn oversized_deeply_nested_or_long_named_input_is_refused_before_use() {
        let deep = format!("releases: {}{}\n", "[".repeat(50_000), "]".repeat(50_000));
        // Refused where the nesting passes the bound (column 75), not after reading it all.
        let err = Config::from_yaml(&deep, "deep.yaml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "deep.yaml:1:75: nested deeper than 64 levels"
        );

        let huge = "#".repeat(MAX_CONFIG_BYTES + 1);
        let err = Config::from_yaml(&huge, "huge.yaml").unwrap_err();
        assert!(
            err.to_string().contains("a configuration may have at most"),
            "{err}"
        );

        let long = "x".repeat(MAX_NAME_BYTES + 1);
        let yaml = format!(
            "services:\n  - name: a\n    versions: [{{name: v1, primary: true}}]\n\
             releases:\n  - {{name: {long}, priority: 1, match: [{{header: x, exact: y}}], \
             targets: {{a: v1}}}}\n"
        );
        let err = Config::from_yaml(&yaml, "long.yaml").unwrap_err();
        assert!(
            err.to_string()
                .contains("release name: 254 bytes; at most 253"),
            "{err}"
        );
        // The seed's examples are far inside every bound.
        let example = include_str!("../../deploy/examples/food-delivery.yaml");
        assert!(Config::from_yaml(example, "food-delivery.yaml").is_ok());
    }

    #[test]
    fn request_timeouts_read_and_write_as_people_write_them() {
        let yaml = "services:\n  - name: a\n    versions: [{name: v1, primary: true}]\n    \
                    requestTimeout: 1m30s\n";
        let config = Config::from_yaml(yaml, "t.yaml").unwrap();
        let timeout = config.services[0].request_timeout;
        assert_eq!(timeout, Some(Duration::from_secs(90)));
        let written = serde_yaml_ng::to_string(&config).unwrap();
        assert!(written.contains("requestTimeout: 1m 30s"), "{written}");
        let again = Config::from_yaml(&written, "again.yaml").unwrap();
        assert_eq!(again.services[0].request_timeout, timeout);
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["services"][0]["requestTimeout"], "1m 30s");
    }

    #[test]
    fn opt_out_cgroups_are_paths_and_absent_by_default() {
        let config = Config::from_yaml("optOutCgroups: [pod-a, /sys/fs/cgroup/b]\n", "t.yaml");
        let paths = config.unwrap().opt_out_cgroups;
        assert_eq!(paths, [PathBuf::from("pod-a"), "/sys/fs/cgroup/b".into()]);
        let written = serde_yaml_ng::to_string(&Config::default()).unwrap();
        assert!(!written.contains("optOut"), "{written}");
    }

    #[test]
    fn zero_or_unreadable_request_timeouts_are_refused_with_the_line() {
        for (value, reason) in [("0s", "more than zero"), ("soon", "not a duration")] {
            let yaml = format!(
                "services:\n  - name: a\n    versions: [{{name: v1, primary: true}}]\n    \
                 requestTimeout: {value}\n"
            );
            // The error points at the service (the YAML parser's custom errors carry the
            // location of the enclosing mapping) and names the field and the value.
            let err = Config::from_yaml(&yaml, "t.yaml").unwrap_err();
            assert_eq!(err.line, Some(2), "{err}");
            assert!(err.reason.contains(reason), "{err}");
            assert!(err.to_string().contains("services[0]"), "{err}");
            assert!(
                err.reason.contains(&format!("requestTimeout `{value}`")),
                "{err}"
            );
        }
    }
}
