//! Where the agent's stamp keys come from. Every node of a mesh must sign with the same key, so
//! a key file an operator names must be there and hold a key: an agent that made up a key of its
//! own would start, and silently break every stamp that crosses to another node. Only the
//! implicit default next to a configuration file (one machine) may be made.

use std::{
    io::{ErrorKind, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use anyhow::{Context, Result, bail};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::proxy::stamp::StampKeys;

/// How to make a key by hand, for the errors.
const MAKE_ONE: &str = "head -c 32 /dev/urandom | base64 > FILE && chmod 600 FILE";

/// Reads a key file that must exist: a regular file (a symlink to one is fine, as a Secret
/// volume mounts it), not writable by group or others, holding at least one key.
pub fn load(path: &Path) -> Result<StampKeys> {
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == ErrorKind::NotFound => {
            if std::fs::symlink_metadata(path).is_ok() {
                bail!("stamp key file {shown} is a symlink to a file that does not exist");
            }
            bail!(
                "stamp key file {shown} does not exist: every node needs the same key, so none \
                 is made for a file named with --stamp-key (make it: {MAKE_ONE})"
            );
        }
        Err(err) => return Err(err).with_context(|| format!("stamp key file {shown}")),
    };
    if !meta.is_file() {
        bail!("stamp key file {shown} is not a regular file");
    }
    refuse_writable_by_others(meta.permissions().mode())
        .with_context(|| format!("stamp key file {shown}"))?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read stamp key {shown}"))?;
    StampKeys::from_text(&text).with_context(|| format!("stamp key file {shown}"))
}

/// Reads the implicit default key file of a configuration file, or makes it (mode 0600) with a
/// new random key when there is none. Its directory is the configuration's: it exists, and
/// nothing is made on the way to it.
pub fn load_or_make(path: &Path) -> Result<StampKeys> {
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| anyhow::anyhow!("no randomness for a stamp key"))?;
    // create_new is O_EXCL: it follows no symlink, and of agents starting together one writes
    // and the others read its key.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut file) => {
            writeln!(file, "{}", URL_SAFE_NO_PAD.encode(key))
                .and_then(|()| file.sync_all())
                .with_context(|| format!("cannot write {}", path.display()))?;
            tracing::info!(path = %path.display(), "made a new stamp key");
        }
        Err(err) if err.kind() == ErrorKind::AlreadyExists => {}
        Err(err) => return Err(err).with_context(|| format!("cannot write {}", path.display())),
    }
    // Written whole before it is read: a file another agent is writing may be short.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match load(path) {
            Ok(keys) => return Ok(keys),
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(err) => return Err(err),
        }
    }
}

/// A key others can write is a key others can choose (ssh refuses such keys for the same
/// reason).
fn refuse_writable_by_others(mode: u32) -> Result<()> {
    if mode & 0o022 != 0 {
        bail!(
            "is writable by group or others (mode {:04o}): anyone who can write it can mint \
             stamps; chmod go-w it",
            mode & 0o7777
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(std::path::PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir = std::env::temp_dir().join(format!("steer-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn error(result: Result<StampKeys>) -> String {
        format!("{:#}", result.err().expect("refused"))
    }

    #[test]
    fn a_named_key_file_must_exist_and_nothing_is_made_for_it() {
        let dir = Dir::new("stamp-named");
        let missing = dir.0.join("no-such-dir/key");
        let err = error(load(&missing));
        assert!(err.contains("does not exist"), "{err}");
        assert!(!dir.0.join("no-such-dir").exists(), "a directory was made");
    }

    #[test]
    fn a_dangling_symlink_is_refused() {
        let dir = Dir::new("stamp-dangling");
        let link = dir.0.join("key");
        std::os::unix::fs::symlink(dir.0.join("gone"), &link).unwrap();
        let err = error(load(&link));
        assert!(
            err.contains("symlink to a file that does not exist"),
            "{err}"
        );
        // Not even the implicit default writes through it.
        assert!(load_or_make(&link).is_err());
        assert!(!dir.0.join("gone").exists());
    }

    #[test]
    fn a_key_file_others_can_write_is_refused() {
        let dir = Dir::new("stamp-mode");
        let path = dir.0.join("key");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        for (mode, ok) in [(0o600, true), (0o644, true), (0o400, true), (0o620, false)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(load(&path).is_ok(), ok, "mode {mode:o}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = error(load(&path));
        assert!(
            err.contains("writable by group or others (mode 0666)"),
            "{err}"
        );
    }

    #[test]
    fn an_empty_or_short_key_file_is_refused() {
        let dir = Dir::new("stamp-empty");
        let path = dir.0.join("key");
        std::fs::write(&path, "\n").unwrap();
        assert!(error(load(&path)).contains("no key"));
        std::fs::write(&path, "short\n").unwrap();
        assert!(error(load(&path)).contains("at least 16 bytes"));
        assert!(error(load(&dir.0)).contains("not a regular file"));
    }

    #[test]
    fn the_default_key_file_is_made_once_private_and_read_back() {
        let dir = Dir::new("stamp-default");
        let path = dir.0.join("steer-stamp.key");
        let made = load_or_make(&path).unwrap();
        let again = load_or_make(&path).unwrap();
        assert_eq!(made.sign("red"), again.sign("red"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
