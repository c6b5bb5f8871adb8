use super::*;

fn load(yaml: &str) -> Config {
    Config::from_yaml(yaml, "test.yaml").unwrap()
}

fn codes(report: &Report) -> Vec<&'static str> {
    report.errors.iter().map(|f| f.code).collect()
}

const SERVICES: &str = r#"
services:
  - name: email
    versions:
      - { name: v2.0, primary: true }
      - { name: v2.1 }
      - { name: v2.0.1 }
"#;

#[test]
fn a_version_belongs_to_at_most_one_release() {
    let report = check(&load(&format!(
        "{SERVICES}releases:
  - {{ name: a, priority: 1, match: [{{header: x-device, exact: android}}], targets: {{email: v2.1}} }}
  - {{ name: b, priority: 2, match: [{{header: x-region, exact: atlantis}}], targets: {{email: v2.1}} }}
"
    )));
    assert!(!report.valid);
    let finding = report
        .errors
        .iter()
        .find(|f| f.code == "version-in-two-releases")
        .expect("conflict reported");
    assert_eq!(finding.releases, ["a", "b"]);
}

#[test]
fn structural_errors_each_have_their_code() {
    let report = check(&load(
        r#"
services:
  - name: s
    versions: [{ name: v1 }, { name: v1 }]
releases:
  - { name: r, priority: 1, match: [], targets: { t: v1 } }
  - { name: r, priority: 2, match: [{ header: x, regex: "(" }], targets: { s: v9 } }
  - { name: p, priority: 3, match: [{ header: x, exact: y }], percent: 120, hashBy: u }
  - { name: q, priority: 4, match: [{ header: x, exact: y, prefix: z }], percent: 5 }
"#,
    ));
    let codes = codes(&report);
    for code in [
        "no-primary",
        "duplicate-name",
        "empty-match",
        "unknown-service",
        "unknown-version",
        "invalid-regex",
        "invalid-percent",
    ] {
        assert!(codes.contains(&code), "{code} missing from {codes:?}");
    }
}

#[test]
fn address_headers_are_a_warning_not_an_error() {
    let report = check(&load(&format!(
        "{SERVICES}releases:
  - {{ name: a, priority: 1, match: [{{header: X-Forwarded-For, exact: 10.0.0.1}}], targets: {{email: v2.1}} }}
"
    )));
    assert!(report.valid, "{report:?}");
    assert_eq!(report.warnings[0].code, "address-tag");
}
