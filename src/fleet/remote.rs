//! Remote configuration: what an operator sets for an agent (`PUT /api/v1/agents/{id}/config`)
//! and the OpAMP server offers it, and how the agent reports applying it.

use secumon_proto::opamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Most files in one configuration.
pub const MAX_FILES: usize = 64;
/// Longest file name and content type, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// One file (or section) of a configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The file's text.
    pub body: String,
    /// Its MIME type (`text/yaml`, `application/json`, …), empty when unsaid.
    #[serde(default)]
    pub content_type: String,
}

/// A configuration: files by name (an agent with one file may name it `""`), kept in name
/// order so that its stored text, and so its hash, depend on its content alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    pub config_map: BTreeMap<String, ConfigFile>,
}

impl RemoteConfig {
    /// Reads a configuration an operator sent, within `max_bytes` of file bodies in all.
    pub fn parse(body: &[u8], max_bytes: usize) -> Result<RemoteConfig, String> {
        let config: RemoteConfig = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        if config.config_map.is_empty() {
            return Err("config_map has no file: DELETE the configuration instead".into());
        }
        if config.config_map.len() > MAX_FILES {
            return Err(format!("more than {MAX_FILES} files"));
        }
        if let Some((name, _)) = config.config_map.iter().find(|(name, file)| {
            name.len() > MAX_NAME_BYTES || file.content_type.len() > MAX_NAME_BYTES
        }) {
            return Err(format!(
                "file {name:?}: names and content types are at most {MAX_NAME_BYTES} bytes"
            ));
        }
        let bytes: usize = config.config_map.values().map(|f| f.body.len()).sum();
        if bytes > max_bytes {
            return Err(format!(
                "{bytes} bytes of file bodies, over the limit of {max_bytes} (--fleet-max-config-bytes)"
            ));
        }
        Ok(config)
    }

    /// The text the catalog keeps.
    pub fn to_stored(&self) -> String {
        serde_json::to_string(self).expect("a configuration serialises")
    }

    /// The configuration kept as `stored`; `None` when there is none.
    pub fn from_stored(stored: &str) -> Option<RemoteConfig> {
        if stored.is_empty() {
            return None;
        }
        serde_json::from_str(stored).ok()
    }

    /// The hash the agent reports back: SHA-256 of the stored text.
    pub fn hash(&self) -> Vec<u8> {
        hash_stored(&self.to_stored())
    }

    /// The offer of this configuration to an agent.
    pub fn to_offer(&self) -> opamp::AgentRemoteConfig {
        opamp::AgentRemoteConfig {
            config: Some(opamp::AgentConfigMap {
                config_map: self
                    .config_map
                    .iter()
                    .map(|(name, file)| {
                        (
                            name.clone(),
                            opamp::AgentConfigFile {
                                body: file.body.clone().into_bytes(),
                                content_type: file.content_type.clone(),
                            },
                        )
                    })
                    .collect(),
            }),
            config_hash: self.hash(),
        }
    }
}

/// The hash of the configuration kept as `stored` (its text is canonical: what
/// [`RemoteConfig::to_stored`] wrote), without reading it back.
pub fn hash_stored(stored: &str) -> Vec<u8> {
    Sha256::digest(stored.as_bytes()).to_vec()
}

/// How the agent last reported the remote configuration, as the catalog keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfigStatus {
    /// Hex of the hash the agent reported.
    pub config_hash: String,
    /// `unset`, `applied`, `applying` or `failed`.
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error_message: String,
}

impl ConfigStatus {
    pub fn from_report(report: &opamp::RemoteConfigStatus) -> ConfigStatus {
        use opamp::RemoteConfigStatuses as S;
        let status = match S::try_from(report.status) {
            Ok(S::Applied) => "applied",
            Ok(S::Applying) => "applying",
            Ok(S::Failed) => "failed",
            _ => "unset",
        };
        ConfigStatus {
            // Our hashes are 32 bytes; a longer one is no hash of ours, and is not kept whole.
            config_hash: hex(
                &report.last_remote_config_hash[..report.last_remote_config_hash.len().min(64)]
            ),
            status: status.into(),
            error_message: truncate(&report.error_message, 1024),
        }
    }

    pub fn from_stored(stored: &str) -> Option<ConfigStatus> {
        serde_json::from_str(stored).ok()
    }

    pub fn to_stored(&self) -> String {
        serde_json::to_string(self).expect("a status serialises")
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// At most `max` bytes of `text`, cut at a character boundary.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_hashes_by_content_and_is_bounded() {
        let a = RemoteConfig::parse(
            br#"{"config_map":{"b":{"body":"x: 1"},"a":{"body":"{}","content_type":"application/json"}}}"#,
            100,
        )
        .unwrap();
        let b = RemoteConfig::parse(
            br#"{"config_map":{"a":{"content_type":"application/json","body":"{}"},"b":{"body":"x: 1"}}}"#,
            100,
        )
        .unwrap();
        assert_eq!(a.hash(), b.hash(), "file order and key order do not count");
        assert_eq!(a.hash().len(), 32);
        assert_eq!(hash_stored(&a.to_stored()), a.hash());
        assert_eq!(RemoteConfig::from_stored(&a.to_stored()), Some(a.clone()));
        let offer = a.to_offer();
        assert_eq!(offer.config.unwrap().config_map["a"].body, b"{}");
        assert!(RemoteConfig::parse(br#"{"config_map":{"a":{"body":"12345"}}}"#, 4).is_err());
        assert!(RemoteConfig::parse(br#"{"config_map":{}}"#, 4).is_err());
        assert!(RemoteConfig::parse(br#"{"files":{}}"#, 4).is_err());
        assert_eq!(truncate("héllo", 2), "h");
    }
}
