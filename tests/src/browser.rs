//! Debian's headless chromium, for tests of the agent's live page: load a page and read the
//! DOM the page's scripts built, or take a screenshot. Each run gets a fresh profile directory
//! and is killed (with the processes it started) if it does not finish in time.

use std::{
    collections::HashMap,
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// How long one chromium run may take.
const TIMEOUT: Duration = Duration::from_secs(90);
/// Virtual time the page gets to run its timers and fetches before the DOM is read.
const SETTLE_MS: u32 = 5000;

/// The chromium binary (`cargo xtask setup` installs Debian's `chromium`).
pub fn chromium() -> Result<&'static str> {
    for candidate in ["chromium", "chromium-browser"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {candidate}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(candidate);
        }
    }
    bail!("chromium is not installed (cargo xtask setup installs it)")
}

fn run(args: &[String]) -> Result<String> {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let profile = std::env::temp_dir().join(format!(
        "steer-chromium-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&profile)?;
    let _cleanup = RemoveDir(&profile);
    let mut command = Command::new(chromium()?);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // Its own process group: on a timeout the browser and its helpers go together.
        .process_group(0);
    let mut child = command.spawn().context("start chromium")?;
    let pid = child.id() as i32;
    let stdout = child.stdout.take().context("chromium's stdout")?;
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut { stdout }, &mut out);
        out
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > TIMEOUT {
            // SAFETY: signals the process group of the chromium this function started.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = child.wait();
            bail!("chromium did not finish in {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Helpers still running after the browser exited belong to this run too.
    // SAFETY: as above; the group is ours.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        bail!("chromium failed: {status}");
    }
    Ok(out)
}

struct RemoveDir<'a>(&'a Path);

impl Drop for RemoveDir<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0);
    }
}

/// The DOM of `url` after its scripts ran for a few (virtual) seconds.
pub fn dump_dom(url: &str) -> Result<String> {
    run(&[
        format!("--virtual-time-budget={SETTLE_MS}"),
        "--dump-dom".to_string(),
        url.to_string(),
    ])
}

/// A PNG of `url` at `width`x`height` after its scripts ran.
pub fn screenshot(url: &str, out: &Path, width: u32, height: u32) -> Result<()> {
    run(&[
        format!("--virtual-time-budget={SETTLE_MS}"),
        format!("--window-size={width},{height}"),
        format!("--screenshot={}", out.display()),
        url.to_string(),
    ])?;
    if !out.exists() {
        bail!("chromium wrote no screenshot to {}", out.display());
    }
    Ok(())
}

/// The attributes of every element of `dom` whose start tag begins with `start` (e.g.
/// `<g class="edge"`): enough to read a page built by our own script, no HTML parser.
pub fn elements(dom: &str, start: &str) -> Vec<HashMap<String, String>> {
    let mut found = Vec::new();
    let mut rest = dom;
    while let Some(at) = rest.find(start) {
        let tag = &rest[at..];
        let end = tag.find('>').unwrap_or(tag.len());
        found.push(attributes(&tag[1..end]));
        rest = &tag[end..];
    }
    found
}

fn attributes(tag: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = tag;
    while let Some(eq) = rest.find("=\"") {
        let name = rest[..eq].rsplit(' ').next().unwrap_or("").to_string();
        let value_start = eq + 2;
        let Some(len) = rest[value_start..].find('"') else {
            break;
        };
        let value = rest[value_start..value_start + len]
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"");
        out.insert(name, value);
        rest = &rest[value_start + len + 1..];
    }
    out
}

/// The text of `dom` with tags removed, whitespace collapsed.
pub fn text(dom: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in dom.chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}
