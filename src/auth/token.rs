//! API tokens: their text form, their hash, and their scopes.
//!
//! A token is `smn_`, 64 hex digits of 32 random bytes, and 8 hex digits of a CRC-32 of what
//! precedes them: 76 characters. The prefix lets secret scanners and people tell it apart; the
//! checksum lets the server refuse a mistyped or made-up token without a catalog lookup (as
//! GitHub's `ghp_` and Grafana's `glsa_` tokens do). Only the SHA-256 of the whole token is
//! stored. A slow password hash (argon2, bcrypt) is for secrets people choose: a 256-bit random
//! token cannot be guessed, so one fast hash per request suffices, and a slow one would cost
//! milliseconds of CPU on every ingest request.

use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

pub const PREFIX: &str = "smn_";
const SECRET_HEX: usize = 64;
const CHECK_HEX: usize = 8;
pub const TOKEN_LEN: usize = PREFIX.len() + SECRET_HEX + CHECK_HEX;

/// A new random token, as shown once to its owner.
pub fn generate() -> std::io::Result<String> {
    let mut secret = [0u8; SECRET_HEX / 2];
    getrandom::getrandom(&mut secret).map_err(std::io::Error::other)?;
    let mut token = String::with_capacity(TOKEN_LEN);
    token.push_str(PREFIX);
    token.push_str(&hex(&secret));
    let check = crc32fast::hash(token.as_bytes());
    token.push_str(&format!("{check:08x}"));
    Ok(token)
}

/// A random public id for a token record: 16 hex digits.
pub fn generate_id() -> std::io::Result<String> {
    let mut id = [0u8; 8];
    getrandom::getrandom(&mut id).map_err(std::io::Error::other)?;
    Ok(hex(&id))
}

/// Whether `text` has a token's form (prefix, length, hex digits, checksum).
pub fn well_formed(text: &str) -> bool {
    if text.len() != TOKEN_LEN
        || !text.starts_with(PREFIX)
        || !text[PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return false;
    }
    let (body, check) = text.split_at(PREFIX.len() + SECRET_HEX);
    u32::from_str_radix(check, 16).is_ok_and(|c| c == crc32fast::hash(body.as_bytes()))
}

/// The hex SHA-256 of a token: what the catalog keeps.
pub fn hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Write samples: remote-write, OTLP over HTTP and gRPC.
    Ingest,
    /// Read: the Prometheus query and metadata API.
    Read,
    /// Manage the tenant's tokens (and agents).
    Admin,
    /// Everything, in every tenant (a request names its tenant with `X-Scope-OrgID`).
    Operator,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Ingest, Scope::Read, Scope::Admin, Scope::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Admin => "admin",
            Scope::Operator => "operator",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of scopes; written as a comma-separated list (`ingest,read`).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Scopes(u8);

impl Scopes {
    pub const NONE: Scopes = Scopes(0);

    /// Every scope: what a request has when authentication is off.
    pub fn all() -> Scopes {
        Scope::ALL.into_iter().collect()
    }

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// Whether a caller with these scopes may do what `scope` allows: the operator scope
    /// allows everything.
    pub fn allows(self, scope: Scope) -> bool {
        self.contains(scope) || self.contains(Scope::Operator)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        Scopes(iter.into_iter().fold(0, |bits, s| bits | s.bit()))
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Scope::ALL
            .into_iter()
            .filter(|s| self.contains(*s))
            .map(Scope::as_str)
            .collect();
        f.write_str(&names.join(","))
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scopes({self})")
    }
}

impl FromStr for Scopes {
    type Err = String;

    /// `ingest,read`; at least one scope, each known.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut scopes = Scopes::NONE;
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let scope = Scope::ALL
                .into_iter()
                .find(|s| s.as_str() == name)
                .ok_or_else(|| {
                    format!("unknown scope {name:?}: give ingest, read, admin or operator")
                })?;
            scopes.0 |= scope.bit();
        }
        if scopes.is_empty() {
            return Err("no scope given: give ingest, read, admin or operator".into());
        }
        Ok(scopes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_well_formed_distinct_and_hashed_as_sha256() {
        let (a, b) = (generate().unwrap(), generate().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), TOKEN_LEN);
        assert!(well_formed(&a) && well_formed(&b));
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hash(&a).len(), 64);
    }

    #[test]
    fn a_changed_digit_or_wrong_shape_is_not_well_formed() {
        let token = generate().unwrap();
        let mut changed = token.clone().into_bytes();
        changed[10] = if changed[10] == b'0' { b'1' } else { b'0' };
        assert!(!well_formed(std::str::from_utf8(&changed).unwrap()));
        assert!(!well_formed(&token[1..]));
        assert!(!well_formed(&token.to_uppercase()));
        assert!(!well_formed(&format!("{token}0")));
        assert!(!well_formed(""));
        assert!(!well_formed(&"é".repeat(38)));
    }

    #[test]
    fn scopes_parse_print_and_allow() {
        let scopes: Scopes = "read, ingest".parse().unwrap();
        assert_eq!(scopes.to_string(), "ingest,read");
        assert!(scopes.allows(Scope::Read) && !scopes.allows(Scope::Admin));
        let operator: Scopes = "operator".parse().unwrap();
        assert!(Scope::ALL.into_iter().all(|s| operator.allows(s)));
        assert!("".parse::<Scopes>().is_err());
        assert!("read,write"
            .parse::<Scopes>()
            .unwrap_err()
            .contains("write"));
        assert_eq!(
            Scopes::all().to_string().parse::<Scopes>(),
            Ok(Scopes::all())
        );
    }
}
