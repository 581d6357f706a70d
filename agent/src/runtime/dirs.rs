//! Each attempt's input, output and scratch directories, and the pool that
//! keeps finished attempts' trees for the next ones.
//!
//! Making and removing three directories per attempt was the agent's largest
//! CPU cost on short jobs: ext4 allocates and frees an inode for each, and
//! searches past recently freed ones to do so. A tree that the job left as
//! it was made (empty output and scratch, the same modes and owner) is
//! renamed into the pool when the attempt ends, and the next attempt renames
//! it into place: two renames instead of six directory operations.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::RuntimeError;

/// Modes set on what [`JobDirs`] makes, whatever the umask: the job may
/// run as any user, so output and scratch are writable by all, while the
/// root keeps others from listing its neighbours.
const ROOT_MODE: u32 = 0o711;
const WORK_MODE: u32 = 0o777;

/// An attempt's managed directories on the host. The job sees them as
/// `/input` (read-only), `/output` and `/scratch` in a container, and as
/// `$DROVER_INPUT_DIR`, `$DROVER_OUTPUT_DIR`, `$DROVER_SCRATCH_DIR` in
/// every runtime.
#[derive(Debug, Clone)]
pub struct JobDirs {
    pub root: PathBuf,
    pub input: PathBuf,
    pub output: PathBuf,
    pub scratch: PathBuf,
}

impl JobDirs {
    fn under(root: PathBuf, shared_input: Option<&Path>) -> JobDirs {
        JobDirs {
            input: shared_input
                .map(Path::to_path_buf)
                .unwrap_or_else(|| root.join("input")),
            output: root.join("output"),
            scratch: root.join("scratch"),
            root,
        }
    }

    /// Makes `root/{input,output,scratch}`. With `shared_input`, an attempt
    /// with no inputs sees that (empty, read-only, shared by all such
    /// attempts) directory as its input instead of a fresh one.
    pub async fn create(
        root: PathBuf,
        shared_input: Option<&Path>,
    ) -> Result<JobDirs, RuntimeError> {
        Self::make(None, root, shared_input).await
    }

    /// [`JobDirs::create`], taking a tree from `pool` when there is one
    /// that fits (the attempt has no inputs of its own).
    pub async fn create_in(
        pool: &DirPool,
        root: PathBuf,
        shared_input: Option<&Path>,
    ) -> Result<JobDirs, RuntimeError> {
        let tree = shared_input.and_then(|_| pool.take());
        Self::make(tree, root, shared_input).await
    }

    async fn make(
        tree: Option<PathBuf>,
        root: PathBuf,
        shared_input: Option<&Path>,
    ) -> Result<JobDirs, RuntimeError> {
        let dirs = JobDirs::under(root, shared_input);
        let own_input = shared_input.is_none();
        // One blocking task for it all (each tokio::fs call would be one).
        let make = {
            let dirs = dirs.clone();
            move || -> std::io::Result<()> {
                if let Some(tree) = tree {
                    if place(&tree, &dirs.root).is_ok() {
                        return Ok(());
                    }
                    let _ = std::fs::remove_dir_all(&tree);
                }
                make_tree(&dirs, own_input)
            }
        };
        let made = tokio::task::spawn_blocking(make)
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        if let Err(e) = made {
            dirs.remove().await;
            return Err(RuntimeError::Infra(format!(
                "cannot create the attempt's dirs under {}: {e} — is the data dir writable? (DROVER_DATA_DIR)",
                dirs.root.display()
            )));
        }
        Ok(dirs)
    }

    /// The dirs under `root` as [`JobDirs::create`] made them (an adopted
    /// attempt's).
    pub fn at(root: PathBuf) -> JobDirs {
        JobDirs::under(root, None)
    }

    pub async fn remove(&self) {
        if let Err(e) = tokio::fs::remove_dir_all(&self.root).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.root.display(), "cannot remove the attempt's dirs: {e}");
            }
        }
    }

    /// Done with the attempt: its tree goes back to `pool` when `reusable`
    /// (nothing the job started can still reach it) and the job left it as
    /// it was made; otherwise it is removed. `agent_files` are the agent's
    /// own files in the root (the lease kept for adoption), dropped first.
    pub async fn release(
        &self,
        pool: &DirPool,
        agent_files: &'static [&'static str],
        reusable: bool,
    ) {
        let Some(slot) = reusable.then(|| pool.reserve()).flatten() else {
            return self.remove().await;
        };
        let dirs = self.clone();
        let kept = tokio::task::spawn_blocking(move || {
            for file in agent_files {
                let _ = std::fs::remove_file(dirs.root.join(file));
            }
            if untouched(&dirs) && std::fs::rename(&dirs.root, &slot).is_ok() {
                return Some(slot);
            }
            if let Err(e) = std::fs::remove_dir_all(&dirs.root) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %dirs.root.display(), "cannot remove the attempt's dirs: {e}");
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        pool.returned(kept);
    }

    /// For the job's environment.
    pub fn env(&self) -> [(&'static str, &Path); 3] {
        [
            ("DROVER_INPUT_DIR", self.input.as_path()),
            ("DROVER_OUTPUT_DIR", self.output.as_path()),
            ("DROVER_SCRATCH_DIR", self.scratch.as_path()),
        ]
    }
}

/// Makes the tree from nothing, modes set explicitly.
fn make_tree(dirs: &JobDirs, own_input: bool) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let make = |dir: &Path, mode: u32| -> std::io::Result<()> {
        std::fs::DirBuilder::new().mode(mode).create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
    };
    // A leftover of a crashed run of the same attempt must not leak in.
    match std::fs::remove_dir_all(&dirs.root) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    if let Some(parent) = dirs.root.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if !own_input && !dirs.input.is_dir() {
        std::fs::create_dir_all(&dirs.input)?;
        std::fs::set_permissions(&dirs.input, std::fs::Permissions::from_mode(0o555))?;
    }
    make(&dirs.root, ROOT_MODE)?;
    if own_input {
        make(&dirs.input, 0o755)?;
    }
    make(&dirs.output, WORK_MODE)?;
    make(&dirs.scratch, WORK_MODE)
}

/// Renames a pooled tree to `root`, replacing whatever a crashed run of the
/// same attempt left there.
fn place(tree: &Path, root: &Path) -> std::io::Result<()> {
    match std::fs::rename(tree, root) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
            std::fs::remove_dir_all(root)?;
            std::fs::rename(tree, root)
        }
        other => other,
    }
}

/// Whether the tree is exactly as [`make_tree`] made it for an attempt
/// without inputs of its own: the root holds only output and scratch, both
/// empty, none of them a link, all with their modes and the agent's owner.
fn untouched(dirs: &JobDirs) -> bool {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let as_made = |dir: &Path, mode: u32| {
        std::fs::symlink_metadata(dir)
            .is_ok_and(|m| m.is_dir() && m.mode() & 0o7777 == mode && m.uid() == me)
    };
    let names = |dir: &Path| -> Option<Vec<OsString>> {
        let mut names = std::fs::read_dir(dir)
            .ok()?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        names.sort();
        Some(names)
    };
    as_made(&dirs.root, ROOT_MODE)
        && as_made(&dirs.output, WORK_MODE)
        && as_made(&dirs.scratch, WORK_MODE)
        && names(&dirs.root).is_some_and(|n| n == ["output", "scratch"])
        && names(&dirs.output).is_some_and(|n| n.is_empty())
        && names(&dirs.scratch).is_some_and(|n| n.is_empty())
}

/// Finished attempts' trees, ready for the next attempts (see the module
/// docs). Holds at most `cap` trees under its own directory, which it empties
/// when made: what an earlier run of the agent left there is not trusted.
#[derive(Debug)]
pub struct DirPool {
    root: PathBuf,
    cap: usize,
    state: Mutex<PoolState>,
}

#[derive(Debug, Default)]
struct PoolState {
    free: Vec<PathBuf>,
    /// Slots handed out by `reserve` and not yet `returned`.
    reserved: usize,
    next: u64,
}

impl DirPool {
    /// A pool under `root` (on the same filesystem as the attempts: trees
    /// move by rename). A `root` that cannot be made leaves the pool
    /// disabled: every attempt makes and removes its own tree.
    pub fn new(root: PathBuf, cap: usize) -> DirPool {
        let made = match std::fs::remove_dir_all(&root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&root)
            }
        };
        if let Err(e) = &made {
            tracing::warn!(dir = %root.display(), "cannot keep finished attempts' dirs for reuse: {e}");
        }
        DirPool {
            root,
            cap: if made.is_ok() { cap } else { 0 },
            state: Mutex::new(PoolState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self) -> Option<PathBuf> {
        self.state().free.pop()
    }

    /// A place for one more tree, if the pool has room.
    fn reserve(&self) -> Option<PathBuf> {
        let mut st = self.state();
        if st.free.len() + st.reserved >= self.cap {
            return None;
        }
        st.reserved += 1;
        st.next += 1;
        Some(self.root.join(st.next.to_string()))
    }

    /// Ends a [`DirPool::reserve`]: `kept` is the tree now in the pool.
    fn returned(&self, kept: Option<PathBuf>) {
        let mut st = self.state();
        st.reserved -= 1;
        st.free.extend(kept);
    }

    /// Trees in the pool now.
    pub fn len(&self) -> usize {
        self.state().free.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Setup {
        _dir: tempfile::TempDir,
        pool: DirPool,
        attempts: PathBuf,
        empty_input: PathBuf,
    }

    fn setup(cap: usize) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let pool = DirPool::new(dir.path().join("attempts-free"), cap);
        Setup {
            attempts: dir.path().join("attempts"),
            empty_input: dir.path().join("empty-input"),
            pool,
            _dir: dir,
        }
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn ino(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().ino()
    }

    #[tokio::test]
    async fn an_untouched_tree_is_reused_by_the_next_attempt() {
        let s = setup(4);
        let first = JobDirs::create_in(&s.pool, s.attempts.join("a-1"), Some(&s.empty_input))
            .await
            .unwrap();
        let scratch = ino(&first.scratch);
        first.release(&s.pool, &[], true).await;
        assert!(!first.root.exists());
        assert_eq!(s.pool.len(), 1);

        let second = JobDirs::create_in(&s.pool, s.attempts.join("b-1"), Some(&s.empty_input))
            .await
            .unwrap();
        assert!(s.pool.is_empty());
        // The same directories, renamed, with the modes they were made with.
        assert_eq!(ino(&second.scratch), scratch);
        assert_eq!(mode(&second.root), ROOT_MODE);
        assert_eq!(mode(&second.output), WORK_MODE);
        assert_eq!(mode(&second.scratch), WORK_MODE);
        assert_eq!(second.input, s.empty_input);
        assert!(std::fs::read_dir(&second.output).unwrap().next().is_none());
    }

    #[tokio::test]
    async fn a_tree_the_job_changed_is_removed_not_reused() {
        use std::os::unix::fs::PermissionsExt;
        type Change = fn(&JobDirs);
        let changes: [(&str, Change); 5] = [
            ("a file in output", |d| {
                std::fs::write(d.output.join("x"), "x").unwrap()
            }),
            ("a dir in scratch", |d| {
                std::fs::create_dir(d.scratch.join("cache")).unwrap()
            }),
            ("a file in the root", |d| {
                std::fs::write(d.root.join("note"), "x").unwrap()
            }),
            ("output's mode", |d| {
                std::fs::set_permissions(&d.output, std::fs::Permissions::from_mode(0o700)).unwrap()
            }),
            ("scratch replaced by a link", |d| {
                std::fs::remove_dir(&d.scratch).unwrap();
                std::os::unix::fs::symlink("/etc", &d.scratch).unwrap();
            }),
        ];
        for (what, change) in changes {
            let s = setup(4);
            let dirs = JobDirs::create_in(&s.pool, s.attempts.join("a-1"), Some(&s.empty_input))
                .await
                .unwrap();
            change(&dirs);
            dirs.release(&s.pool, &[], true).await;
            assert!(!dirs.root.exists(), "{what}");
            assert!(s.pool.is_empty(), "{what}: reused");
            assert!(std::path::Path::new("/etc/passwd").exists());
        }
    }

    #[tokio::test]
    async fn agent_files_are_dropped_and_unreusable_or_own_input_trees_removed() {
        let s = setup(4);
        let dirs = JobDirs::create_in(&s.pool, s.attempts.join("a-1"), Some(&s.empty_input))
            .await
            .unwrap();
        std::fs::write(dirs.root.join("lease.pb"), "lease").unwrap();
        dirs.release(&s.pool, &["lease.pb"], true).await;
        assert_eq!(s.pool.len(), 1);

        // A job that could still reach its tree: never reused.
        let dirs = JobDirs::create_in(&s.pool, s.attempts.join("b-1"), Some(&s.empty_input))
            .await
            .unwrap();
        dirs.release(&s.pool, &[], false).await;
        assert!(!dirs.root.exists());
        assert!(s.pool.is_empty());

        // Inputs of its own: made fresh, removed after.
        let dirs = JobDirs::create_in(&s.pool, s.attempts.join("c-1"), None)
            .await
            .unwrap();
        assert_eq!(dirs.input, dirs.root.join("input"));
        dirs.release(&s.pool, &[], true).await;
        assert!(!dirs.root.exists());
        assert!(s.pool.is_empty());
    }

    #[tokio::test]
    async fn the_pool_keeps_at_most_its_cap_and_a_leftover_root_is_replaced() {
        let s = setup(2);
        let mut all = Vec::new();
        for i in 0..3 {
            all.push(
                JobDirs::create_in(
                    &s.pool,
                    s.attempts.join(format!("j{i}-1")),
                    Some(&s.empty_input),
                )
                .await
                .unwrap(),
            );
        }
        for dirs in &all {
            dirs.release(&s.pool, &[], true).await;
            assert!(!dirs.root.exists());
        }
        assert_eq!(s.pool.len(), 2);
        assert_eq!(std::fs::read_dir(&s.pool.root).unwrap().count(), 2);

        // What a crashed run of the same attempt left does not leak in.
        let root = s.attempts.join("k-1");
        std::fs::create_dir_all(root.join("output")).unwrap();
        std::fs::write(root.join("output/stale"), "old").unwrap();
        let dirs = JobDirs::create_in(&s.pool, root, Some(&s.empty_input))
            .await
            .unwrap();
        assert!(std::fs::read_dir(&dirs.output).unwrap().next().is_none());
        assert_eq!(s.pool.len(), 1);
    }

    #[test]
    fn a_new_pool_starts_empty_whatever_an_earlier_run_left() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("attempts-free");
        std::fs::create_dir_all(root.join("1/output")).unwrap();
        std::fs::write(root.join("1/output/secret"), "x").unwrap();
        let pool = DirPool::new(root.clone(), 4);
        assert!(pool.is_empty());
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    }
}
