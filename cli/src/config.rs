//! Where the coordinator is, which token to present and which private CA to
//! trust: `--addr`/`--token`/`--ca-file`, then `DROVER_ADDR`/`DROVER_TOKEN`/
//! `DROVER_TLS_CA_FILE`, then a `cli.toml` file (`$DROVER_CONFIG`, else
//! `.drover/cli.toml` here or in any parent, else
//! `$HOME/.config/drover/cli.toml`). `drover dev` writes the file.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::error::UsageError;

pub const ENV_ADDR: &str = "DROVER_ADDR";
pub const ENV_TOKEN: &str = "DROVER_TOKEN";
pub const ENV_CONFIG: &str = "DROVER_CONFIG";
pub const ENV_CA_FILE: &str = "DROVER_TLS_CA_FILE";
/// Where the CLI's private CA comes from, for messages.
pub const CA_SETTING: &str = "--ca-file (DROVER_TLS_CA_FILE, or ca_file in cli.toml)";

pub const NO_ADDR: &str =
    "no coordinator address: pass --addr, set DROVER_ADDR, or start one with `drover dev`";

/// The `cli.toml` file.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// PEM CA certificate(s) to trust besides the public roots; relative to
    /// the file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for FileConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileConfig")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// Where the address came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env,
    File(PathBuf),
}

/// The resolved connection settings. `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Resolved {
    pub addr: String,
    pub token: Option<String>,
    /// A private CA to trust (`--ca-file` is applied by the caller).
    pub ca_file: Option<PathBuf>,
    pub source: Source,
}

impl fmt::Debug for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolved")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .field("source", &self.source)
            .finish()
    }
}

/// Resolves the address and token. `env` looks up environment variables (the
/// process environment in the binary, a map in tests); `cwd` starts the
/// search for `.drover/cli.toml`.
///
/// A file is read only when no address is given by flag or environment, so a
/// file's token is never sent to a server the file does not name; a token
/// from a flag or the environment still wins over the file's.
pub fn resolve(
    flag_addr: Option<&str>,
    flag_token: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
    cwd: &Path,
) -> anyhow::Result<Resolved> {
    let non_empty = |v: Option<String>| v.filter(|v| !v.trim().is_empty());
    let env_token = non_empty(env(ENV_TOKEN));
    let token = non_empty(flag_token.map(str::to_string)).or(env_token);
    let ca_file = non_empty(env(ENV_CA_FILE)).map(|p| cwd.join(p));
    if let Some(addr) = non_empty(flag_addr.map(str::to_string)) {
        return Ok(Resolved {
            addr,
            token,
            ca_file,
            source: Source::Flag,
        });
    }
    if let Some(addr) = non_empty(env(ENV_ADDR)) {
        return Ok(Resolved {
            addr,
            token,
            ca_file,
            source: Source::Env,
        });
    }
    let Some(path) = find_file(env, cwd)? else {
        return Err(UsageError::new(NO_ADDR).into());
    };
    let file = read_file(&path)?;
    let Some(addr) = non_empty(file.addr) else {
        anyhow::bail!("{} has no `addr`; {NO_ADDR}", path.display());
    };
    let file_dir = path.parent().unwrap_or(cwd);
    Ok(Resolved {
        addr,
        token: token.or(non_empty(file.token)),
        ca_file: ca_file.or(file.ca_file.map(|p| file_dir.join(p))),
        source: Source::File(path),
    })
}

/// The config file to use, if any. `$DROVER_CONFIG` must exist when set.
pub fn find_file(
    env: &dyn Fn(&str) -> Option<String>,
    cwd: &Path,
) -> anyhow::Result<Option<PathBuf>> {
    if let Some(path) = env(ENV_CONFIG).filter(|p| !p.is_empty()) {
        let path = cwd.join(path);
        if !path.is_file() {
            anyhow::bail!(
                "{ENV_CONFIG} names {}, which does not exist",
                path.display()
            );
        }
        return Ok(Some(path));
    }
    for dir in cwd.ancestors() {
        let candidate = dir.join(".drover").join("cli.toml");
        if candidate.is_file() {
            return Ok(Some(candidate));
        }
    }
    if let Some(home) = env("HOME").filter(|h| !h.is_empty()) {
        let candidate = Path::new(&home).join(".config/drover/cli.toml");
        if candidate.is_file() {
            return Ok(Some(candidate));
        }
    }
    Ok(None)
}

pub fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Writes a config file readable only by its owner (it holds a token).
pub fn write_file(path: &Path, config: &FileConfig) -> anyhow::Result<()> {
    use std::io::Write;

    let text = toml::to_string(config).context("encoding the CLI config")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Write a fresh private file and rename it over the old one, so the token
    // is never in a file with wider permissions, even briefly.
    let tmp = path.with_extension("toml.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The process environment, for [`resolve`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn write(path: &Path, addr: &str, token: &str) {
        write_file(
            path,
            &FileConfig {
                addr: Some(addr.into()),
                token: Some(token.into()),
                ca_file: None,
            },
        )
        .unwrap();
    }

    #[test]
    fn flag_wins_over_env_and_file() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join(".drover/cli.toml"),
            "http://file:1",
            "file-token",
        );
        let env = env_of(&[(ENV_ADDR, "http://env:1"), (ENV_TOKEN, "env-token")]);
        let got = resolve(Some("http://flag:1"), Some("flag-token"), &env, dir.path()).unwrap();
        assert_eq!(got.addr, "http://flag:1");
        assert_eq!(got.token.as_deref(), Some("flag-token"));
        assert_eq!(got.source, Source::Flag);
    }

    #[test]
    fn env_wins_over_file() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join(".drover/cli.toml"),
            "http://file:1",
            "file-token",
        );
        let env = env_of(&[(ENV_ADDR, "http://env:1"), (ENV_TOKEN, "env-token")]);
        let got = resolve(None, None, &env, dir.path()).unwrap();
        assert_eq!(got.addr, "http://env:1");
        assert_eq!(got.token.as_deref(), Some("env-token"));
        assert_eq!(got.source, Source::Env);
    }

    #[test]
    fn file_token_is_not_sent_to_an_address_from_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join(".drover/cli.toml"),
            "http://file:1",
            "file-token",
        );
        let got = resolve(Some("http://other:1"), None, &env_of(&[]), dir.path()).unwrap();
        assert_eq!(got.token, None);
    }

    #[test]
    fn file_is_found_in_a_parent_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".drover/cli.toml");
        write(&path, "http://file:1", "file-token");
        let nested = dir.path().join("a/b/c");
        std::fs::create_dir_all(&nested).unwrap();
        let got = resolve(None, None, &env_of(&[]), &nested).unwrap();
        assert_eq!(got.addr, "http://file:1");
        assert_eq!(got.token.as_deref(), Some("file-token"));
        assert_eq!(got.source, Source::File(path));
    }

    #[test]
    fn env_token_overrides_the_file_token() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join(".drover/cli.toml"),
            "http://file:1",
            "file-token",
        );
        let env = env_of(&[(ENV_TOKEN, "env-token")]);
        let got = resolve(None, None, &env, dir.path()).unwrap();
        assert_eq!(got.addr, "http://file:1");
        assert_eq!(got.token.as_deref(), Some("env-token"));
    }

    #[test]
    fn drover_config_wins_over_the_directory_search() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join(".drover/cli.toml"),
            "http://nearby:1",
            "t1",
        );
        let explicit = dir.path().join("elsewhere.toml");
        write(&explicit, "http://explicit:1", "t2");
        let env = env_of(&[(ENV_CONFIG, explicit.to_str().unwrap())]);
        let got = resolve(None, None, &env, dir.path()).unwrap();
        assert_eq!(got.addr, "http://explicit:1");
    }

    #[test]
    fn missing_drover_config_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let env = env_of(&[(ENV_CONFIG, "/nonexistent/cli.toml")]);
        let err = resolve(None, None, &env, dir.path()).unwrap_err();
        assert!(err.to_string().contains("DROVER_CONFIG"), "{err}");
    }

    #[test]
    fn home_config_is_the_last_resort() {
        let home = tempfile::tempdir().unwrap();
        write(
            &home.path().join(".config/drover/cli.toml"),
            "http://home:1",
            "t",
        );
        let cwd = tempfile::tempdir().unwrap();
        let env = env_of(&[("HOME", home.path().to_str().unwrap())]);
        let got = resolve(None, None, &env, cwd.path()).unwrap();
        assert_eq!(got.addr, "http://home:1");
    }

    #[test]
    fn nothing_found_says_how_to_fix_it() {
        let cwd = tempfile::tempdir().unwrap();
        let err = resolve(None, None, &env_of(&[]), cwd.path()).unwrap_err();
        assert_eq!(err.to_string(), NO_ADDR);
        assert_eq!(crate::error::exit_code(&err), 2);
    }

    #[test]
    fn written_file_is_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x/cli.toml");
        let config = FileConfig {
            addr: Some("http://a:1".into()),
            token: Some("tok".into()),
            ca_file: Some("ca.pem".into()),
        };
        write_file(&path, &config).unwrap();
        write_file(&path, &config).unwrap();
        assert_eq!(read_file(&path).unwrap(), config);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn ca_file_comes_from_env_else_the_file_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".drover/cli.toml");
        write_file(
            &path,
            &FileConfig {
                addr: Some("https://c:7080".into()),
                token: None,
                ca_file: Some("ca.pem".into()),
            },
        )
        .unwrap();
        let got = resolve(None, None, &env_of(&[]), dir.path()).unwrap();
        assert_eq!(got.ca_file, Some(dir.path().join(".drover/ca.pem")));
        let env = env_of(&[(ENV_CA_FILE, "/etc/ca.pem")]);
        let got = resolve(None, None, &env, dir.path()).unwrap();
        assert_eq!(got.ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));
        let got = resolve(Some("https://x:1"), None, &env_of(&[]), dir.path()).unwrap();
        assert_eq!(got.ca_file, None);
    }

    #[test]
    fn debug_output_hides_tokens() {
        let resolved = Resolved {
            addr: "a".into(),
            token: Some("hunter2".into()),
            ca_file: None,
            source: Source::Flag,
        };
        assert!(!format!("{resolved:?}").contains("hunter2"));
        let file = FileConfig {
            addr: None,
            token: Some("hunter2".into()),
            ca_file: None,
        };
        assert!(!format!("{file:?}").contains("hunter2"));
    }
}
