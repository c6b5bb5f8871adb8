//! `cargo xtask demo`: the seed's case studies, decided and explained by the real `steer` binary.
//!
//! For each scenario it checks the configuration, then prints, per combination of user tags,
//! the path of versions a request takes through the chain and the release it belongs to.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// One of the seed's case studies: a fixture, the call chain, and the tag combinations to show.
pub struct Scenario {
    pub name: &'static str,
    pub title: &'static str,
    pub file: &'static str,
    pub chain: &'static [&'static str],
    pub tags: &'static [&'static [&'static str]],
    /// A misconfigured variant whose check output the demo shows.
    pub broken: Option<&'static str>,
}

const ANDROID: &str = "x-device: android";
const IPHONE: &str = "x-device: iphone";
const ATLANTIS: &str = "x-region: atlantis";

pub const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "food-delivery",
        title: "Seed section 5: food delivery, three overlapping canaries",
        file: "food-delivery.yaml",
        chain: &["order", "restaurant", "delivery"],
        tags: &[
            &[],
            &[ATLANTIS],
            &[ANDROID],
            &[ANDROID, ATLANTIS],
            &[IPHONE],
            &[IPHONE, ATLANTIS],
        ],
        broken: Some("food-delivery-shadowed.yaml"),
    },
    Scenario {
        name: "order-email",
        title: "Seed section 3: order -> email, two teams' canaries at once",
        file: "order-email.yaml",
        chain: &["order", "email"],
        tags: &[&[], &[ANDROID], &[ATLANTIS], &[ANDROID, ATLANTIS]],
        broken: Some("order-email-ambiguous.yaml"),
    },
    Scenario {
        name: "abz",
        title: "Seed section 4: A and B call Z; each canary has its own Z",
        file: "abz.yaml",
        chain: &["a", "b", "z"],
        tags: &[&[], &[ANDROID], &[IPHONE]],
        broken: Some("abz-conflict.yaml"),
    },
];

fn steer(binary: &Path, args: &[&str]) -> Result<(bool, String)> {
    let output = Command::new(binary)
        .args(args)
        .output()
        .with_context(|| format!("run {}", binary.display()))?;
    if output.status.code() == Some(2) {
        bail!(
            "steer {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    ))
}

pub fn run(root: &Path, binary: &Path, scenario: &Scenario) -> Result<()> {
    let examples = root.join("deploy/examples");
    let config = examples.join(scenario.file).display().to_string();
    println!("\n=== {} ===\n", scenario.title);
    let (valid, report) = steer(binary, &["check", "--config", &config])?;
    print!("{report}");
    if !valid {
        bail!("{} should be valid", scenario.file);
    }
    println!(
        "\n{:<38} {:<52} release",
        "user tags",
        scenario.chain.join(" -> ")
    );
    for tags in scenario.tags {
        let mut hops = Vec::new();
        let mut release = String::from("(primary)");
        for service in scenario.chain {
            let mut args = vec!["explain", "--config", &config, "--service", service];
            args.extend(["--format", "json"]);
            for tag in *tags {
                args.extend(["--header", tag]);
            }
            let (_, answer) = steer(binary, &args)?;
            let answer: Value = serde_json::from_str(&answer).context("explain output")?;
            hops.push(format!(
                "{service}/{}",
                answer["version"].as_str().unwrap_or("?")
            ));
            if let Some(name) = answer["release"].as_str() {
                release = name.to_string();
            }
        }
        let label = if tags.is_empty() {
            "(no tags)".to_string()
        } else {
            tags.join(", ")
        };
        println!("{label:<38} {:<52} {release}", hops.join(" -> "));
    }
    if let Some(broken) = scenario.broken {
        let path = examples.join(broken).display().to_string();
        println!("\nA misconfiguration the checker catches ({broken}):");
        let (valid, report) = steer(binary, &["check", "--config", &path])?;
        print!("{report}");
        if valid {
            bail!("{broken} should be rejected");
        }
    }
    Ok(())
}
