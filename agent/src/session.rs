//! The session file (`data_dir/session.json`, mode 0600) that lets a restarted
//! agent resume its session, and the fence deadline file read by the host-side
//! watchdog (DESIGN §3.6, §3.8).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSession {
    pub session_id: String,
    pub session_token: String,
}

pub fn session_path(data_dir: &Path) -> PathBuf {
    data_dir.join("session.json")
}

pub fn fence_path(data_dir: &Path) -> PathBuf {
    data_dir.join("fence-deadline")
}

/// The saved session, if a readable one exists; a corrupt file is ignored
/// (the agent simply registers anew).
pub fn load(data_dir: &Path) -> Option<SavedSession> {
    let text = std::fs::read_to_string(session_path(data_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Saves atomically with mode 0600: the token is a credential.
pub fn save(data_dir: &Path, session: &SavedSession) -> std::io::Result<()> {
    let json = serde_json::to_vec(session).map_err(std::io::Error::other)?;
    write_private(&session_path(data_dir), &json)
}

pub fn forget(data_dir: &Path) {
    let _ = std::fs::remove_file(session_path(data_dir));
}

/// `t` in unix milliseconds, the fence deadline's unit.
pub(crate) fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes the self-fence deadline (unix ms) for the host-side watchdog.
pub fn write_fence_deadline(data_dir: &Path, deadline_unix_ms: u64) -> std::io::Result<()> {
    write_private(
        &fence_path(data_dir),
        deadline_unix_ms.to_string().as_bytes(),
    )
}

/// The fence deadline (unix ms) last written; `None` without a file. A file
/// that does not hold a number is an error: only the agent writes it, whole.
pub fn read_fence_deadline(data_dir: &Path) -> std::io::Result<Option<u64>> {
    let path = fence_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} does not hold a unix time in ms ({e})", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes the fence deadline: no job of this agent runs any more, so no
/// watchdog may act on it later.
pub fn clear_fence_deadline(data_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(fence_path(data_dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(data)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn session_round_trips_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), None);
        let s = SavedSession {
            session_id: "s1".into(),
            session_token: "tok".into(),
        };
        save(dir.path(), &s).unwrap();
        assert_eq!(load(dir.path()), Some(s));
        let mode = std::fs::metadata(session_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        forget(dir.path());
        assert_eq!(load(dir.path()), None);
    }

    #[test]
    fn fence_deadline_is_written_as_unix_ms() {
        let dir = tempfile::tempdir().unwrap();
        write_fence_deadline(dir.path(), 1_700_000_000_123).unwrap();
        let text = std::fs::read_to_string(fence_path(dir.path())).unwrap();
        assert_eq!(text, "1700000000123");
        assert_eq!(
            read_fence_deadline(dir.path()).unwrap(),
            Some(1_700_000_000_123)
        );
        clear_fence_deadline(dir.path()).unwrap();
        assert_eq!(read_fence_deadline(dir.path()).unwrap(), None);
        clear_fence_deadline(dir.path()).unwrap();
        std::fs::write(fence_path(dir.path()), "soon").unwrap();
        let err = read_fence_deadline(dir.path()).unwrap_err();
        assert!(err.to_string().contains("fence-deadline"), "{err}");
    }
}
