//! Files the agent writes and reads back (rollout statuses, a promoted configuration): written
//! whole or not at all, never through a link someone else placed, and read with a size bound.

use std::{
    io::{self, Read, Write},
    path::Path,
};

/// Replaces `path` with `bytes`: a new temporary file in the same directory (created
/// exclusively, so a symlink planted at any name is never followed), synced, renamed over
/// `path`, then the directory synced so the rename survives a crash.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    // A file a person owns keeps its mode (a new one is private to the agent).
    if let Ok(existing) = std::fs::metadata(path) {
        file.as_file().set_permissions(existing.permissions())?;
    }
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|err| err.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// What `path` holds, if it is no larger than `limit` bytes; `Ok(None)` when there is no file.
pub fn read_bounded(path: &Path, limit: u64) -> io::Result<Option<Vec<u8>>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_at_the_target_or_a_temporary_name_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let state = dir.path().join("state.json");
        // The old fixed temporary name and the target itself, both links to the victim.
        std::os::unix::fs::symlink(&victim, dir.path().join("state.json.partial")).unwrap();
        std::os::unix::fs::symlink(&victim, &state).unwrap();
        write_atomically(&state, b"{}").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&state).unwrap(), "{}");
        assert!(!std::fs::symlink_metadata(&state).unwrap().is_symlink());
    }

    #[test]
    fn a_file_over_the_bound_is_refused_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        assert!(read_bounded(&path, 4).unwrap().is_none());
        std::fs::write(&path, "1234").unwrap();
        assert_eq!(read_bounded(&path, 4).unwrap().unwrap(), b"1234");
        std::fs::write(&path, "12345").unwrap();
        let err = read_bounded(&path, 4).unwrap_err();
        assert!(err.to_string().contains("larger than 4 bytes"), "{err}");
    }
}
