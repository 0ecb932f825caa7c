//! How thaw reaches an object store, found the way S3 tools find it: the
//! environment first (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`,
//! `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`), then the profile `AWS_PROFILE` (default
//! `default`) of the shared files `~/.aws/credentials` and `~/.aws/config`
//! (`AWS_SHARED_CREDENTIALS_FILE`, `AWS_CONFIG_FILE`): keys
//! `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`,
//! `region` and `endpoint_url`. Secrets are never printed or logged: their
//! `Debug` says only that they are set.

use std::fmt;
use std::path::{Path, PathBuf};

use super::StoreError;

/// The region when none is set anywhere (what S3-compatible servers
/// usually accept).
pub const DEFAULT_REGION: &str = "us-east-1";

/// A secret value: shown as `<set>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<set>")
    }
}

/// Everything thaw needs to reach a store.
#[derive(Clone, Debug)]
pub struct StoreSettings {
    /// `None`: AWS S3 itself.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
    /// Where each setting came from, for messages (never a value).
    pub source: String,
}

impl StoreSettings {
    /// The settings from this process's environment and the shared files
    /// under `$HOME`.
    pub fn from_environment() -> Result<StoreSettings, StoreError> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        StoreSettings::resolve(&|k| std::env::var(k).ok(), home.as_deref())
    }

    /// The settings from `env` and the shared files (paths from `env`, else
    /// under `home`).
    pub fn resolve(
        env: &dyn Fn(&str) -> Option<String>,
        home: Option<&Path>,
    ) -> Result<StoreSettings, StoreError> {
        let get = |k: &str| env(k).filter(|v| !v.is_empty());
        let profile = get("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let file = |var: &str, default: &str| {
            get(var)
                .map(PathBuf::from)
                .or_else(|| home.map(|h| h.join(".aws").join(default)))
        };
        let credentials = read_profile(
            file("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
            &profile,
            false,
        )?;
        let config = read_profile(file("AWS_CONFIG_FILE", "config"), &profile, true)?;
        let from_files = |key: &str| {
            credentials
                .iter()
                .chain(&config)
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let mut source = Vec::new();
        let endpoint = match get("AWS_ENDPOINT_URL_S3")
            .or_else(|| get("AWS_ENDPOINT_URL"))
            .or_else(|| get("AWS_ENDPOINT"))
        {
            Some(e) => Some(e),
            None => from_files("endpoint_url"),
        };
        if let Some(e) = &endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(StoreError::Settings(format!(
                    "the endpoint {e:?} is not an http:// or https:// URL"
                )));
            }
        }
        let region = get("AWS_REGION")
            .or_else(|| get("AWS_DEFAULT_REGION"))
            .or_else(|| from_files("region"))
            .unwrap_or_else(|| DEFAULT_REGION.into());
        let (access_key_id, secret, token) =
            match (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")) {
                (Some(id), Some(secret)) => {
                    source.push("keys from the environment".to_string());
                    (id, secret, get("AWS_SESSION_TOKEN"))
                }
                (Some(_), None) | (None, Some(_)) => {
                    return Err(StoreError::Settings(
                        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together".into(),
                    ))
                }
                (None, None) => match (
                    from_files("aws_access_key_id"),
                    from_files("aws_secret_access_key"),
                ) {
                    (Some(id), Some(secret)) => {
                        source.push(format!("keys of profile {profile}"));
                        (id, secret, from_files("aws_session_token"))
                    }
                    _ => {
                        return Err(StoreError::Settings(format!(
                            "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or \
                             aws_access_key_id and aws_secret_access_key in profile {profile} of \
                             ~/.aws/credentials (AWS_PROFILE chooses the profile)"
                        )))
                    }
                },
            };
        source.push(match &endpoint {
            Some(e) => format!("endpoint {e}"),
            None => "AWS S3".into(),
        });
        source.push(format!("region {region}"));
        Ok(StoreSettings {
            endpoint,
            region,
            access_key_id,
            secret_access_key: Secret(secret),
            session_token: token.map(Secret),
            source: source.join(", "),
        })
    }
}

/// The keys of `profile` in the INI file at `path` (none if the file or
/// the profile is missing). In the config file a profile other than
/// `default` is the section `[profile NAME]`.
fn read_profile(
    path: Option<PathBuf>,
    profile: &str,
    config_file: bool,
) -> Result<Vec<(String, String)>, StoreError> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StoreError::Io {
                path,
                context: "cannot read".into(),
                source,
            })
        }
    };
    let ini = ini::Ini::load_from_str(&text).map_err(|e| {
        // The parser's message quotes no values, only where it stopped.
        StoreError::Settings(format!(
            "{}: not an INI file: line {}",
            path.display(),
            e.line
        ))
    })?;
    let names = if config_file && profile != "default" {
        vec![format!("profile {profile}")]
    } else {
        vec![profile.to_string()]
    };
    Ok(names
        .iter()
        .filter_map(|n| ini.section(Some(n.as_str())))
        .flat_map(|s| {
            s.iter()
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect())
}
