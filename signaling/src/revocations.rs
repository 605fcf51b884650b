//! The revocation list in the data dir: for each revoked subject (a device
//! id, or a token's subject), the moment of its latest revocation. Every
//! credential of that subject issued at or before that moment is refused;
//! one issued later (a re-enrolled device, a new token) is not.
//!
//! The file (`<pki dir>/revoked.json`, mode 0600) is written whole to a
//! temporary file and renamed, so a crash never leaves half a list. The
//! server owns it while it runs (`POST /api/devices/{id}/revoke`); the CLI
//! writes it directly only when no server answers.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::pki::PkiError;

/// Subject -> Unix seconds of its latest revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocations {
    path: PathBuf,
    revoked: BTreeMap<String, u64>,
}

impl Revocations {
    /// Reads the list in the PKI directory `dir` (empty when there is none).
    pub fn open(dir: &Path) -> Result<Revocations, PkiError> {
        let path = dir.join("revoked.json");
        let revoked = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| PkiError::Certificate(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(PkiError::Io { path, source }),
        };
        Ok(Revocations { path, revoked })
    }

    /// Revokes every credential of `subject` issued at or before `at` (Unix
    /// seconds), saves the list, and returns the moment in force. Each
    /// revocation moves that moment forward, at least by a second: a
    /// credential issued after an earlier revocation in the same second
    /// (stamped the second after it) is covered too.
    pub fn revoke(&mut self, subject: &str, at: u64) -> Result<u64, PkiError> {
        let cutoff = match self.revoked.get(subject) {
            Some(previous) => at.max(previous + 1),
            None => at,
        };
        self.revoked.insert(subject.to_owned(), cutoff);
        self.save()?;
        Ok(cutoff)
    }

    /// Whether a credential of `subject` issued at `issued_at` is revoked.
    pub fn is_revoked(&self, subject: &str, issued_at: u64) -> bool {
        self.revoked.get(subject).is_some_and(|at| issued_at <= *at)
    }

    /// The latest revocation of `subject`, if any.
    pub fn revoked_at(&self, subject: &str) -> Option<u64> {
        self.revoked.get(subject).copied()
    }

    /// Every entry, ordered by subject.
    pub fn entries(&self) -> &BTreeMap<String, u64> {
        &self.revoked
    }

    fn save(&self) -> Result<(), PkiError> {
        let io = |source| PkiError::Io { path: self.path.clone(), source };
        let tmp = self.path.with_extension("json.tmp");
        let _ = fs::remove_file(&tmp);
        // A map of strings to integers always serializes.
        let json = serde_json::to_vec_pretty(&self.revoked).expect("revocation list JSON");
        let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
        file.write_all(&json).and_then(|()| file.sync_all()).map_err(io)?;
        fs::rename(&tmp, &self.path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_survive_reopening_and_spare_later_credentials() {
        let dir = std::env::temp_dir().join(format!("fleetcall-revocations-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut list = Revocations::open(&dir).unwrap();
        assert!(!list.is_revoked("bed-12", 100));
        assert_eq!(list.revoke("bed-12", 1000).unwrap(), 1000);
        let mut list = Revocations::open(&dir).unwrap();
        assert!(list.is_revoked("bed-12", 1000) && list.is_revoked("bed-12", 5));
        assert!(!list.is_revoked("bed-12", 1001), "re-enrolled after the revocation");
        assert!(!list.is_revoked("bed-13", 5));
        assert_eq!(list.revoked_at("bed-12"), Some(1000));
        // Revoked again in the same second (or by a clock that stepped back):
        // the moment still advances, covering what was issued since.
        assert_eq!(list.revoke("bed-12", 1000).unwrap(), 1001);
        assert_eq!(list.revoke("bed-12", 900).unwrap(), 1002);
        assert!(list.is_revoked("bed-12", 1002));
        fs::write(dir.join("revoked.json"), b"{not json").unwrap();
        assert!(Revocations::open(&dir).is_err(), "a damaged list is an error, never an empty list");
        let _ = fs::remove_dir_all(&dir);
    }
}
