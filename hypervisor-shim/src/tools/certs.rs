//! `tls-certs`: a throwaway CA and one certificate per host, for trying migration over TCP
//! (`receive --listen tcp:`, `ctl migrate --to tcp:`) and for the bench and tests. Each host's
//! certificate names the host (an address or a DNS name) and serves both ends of mutual TLS.
//! A production fleet would use its own CA.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use thiserror::Error;

/// Why the files could not be made.
#[derive(Debug, Error)]
pub enum CertsError {
    /// A host name or address that cannot go in a certificate.
    #[error("--host {0}: not a DNS name or an IP address")]
    BadHost(String),
    /// rcgen refused.
    #[error("making the certificates: {0}")]
    Make(#[from] rcgen::Error),
    /// A file could not be written (or already exists).
    #[error("{path}: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The files written for one host.
#[derive(Debug, Clone)]
pub struct HostFiles {
    /// Its certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), CertsError> {
    let err = |e: std::io::Error| CertsError::Write {
        path: path.to_path_buf(),
        reason: if e.kind() == std::io::ErrorKind::AlreadyExists {
            "already exists (remove it first: its key would no longer match)".into()
        } else {
            e.to_string()
        },
    };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

/// Writes `DIR/ca.pem` and, per host, `DIR/HOST.pem` and `DIR/HOST.key` (the CA's key is not
/// kept: add a host by making a new set). Existing files are never overwritten.
pub fn make(dir: &Path, hosts: &[String]) -> Result<Vec<HostFiles>, CertsError> {
    for h in hosts {
        let ok = !h.is_empty()
            && (h.parse::<std::net::IpAddr>().is_ok()
                || h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'));
        if !ok {
            return Err(CertsError::BadHost(h.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| CertsError::Write { path: dir.to_path_buf(), reason: e.to_string() })?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "elastic migration CA (tls-certs)");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca = ca.self_signed(&ca_key)?;
    let mut made = Vec::new();
    let mut files = vec![(dir.join("ca.pem"), ca.pem(), 0o644)];
    for h in hosts {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![h.clone()])?;
        p.distinguished_name.push(DnType::CommonName, h.as_str());
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &ca, &ca_key)?;
        let hf = HostFiles { cert: dir.join(format!("{h}.pem")), key: dir.join(format!("{h}.key")) };
        files.push((hf.cert.clone(), cert.pem(), 0o644));
        files.push((hf.key.clone(), key.serialize_pem(), 0o600));
        made.push(hf);
    }
    // Nothing is written unless nothing is in the way.
    if let Some((p, _, _)) = files.iter().find(|(p, _, _)| p.exists()) {
        return Err(CertsError::Write {
            path: p.clone(),
            reason: "already exists (remove it first: its key would no longer match)".into(),
        });
    }
    for (p, text, mode) in &files {
        write_new(p, text, *mode)?;
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_ca_and_a_pair_per_host_and_never_overwrites() {
        let dir = std::env::temp_dir().join(format!("tls-certs-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let made = make(&dir, &["10.0.0.2".into(), "node-b.example".into()]).unwrap();
        assert_eq!(made.len(), 2);
        assert!(std::fs::read_to_string(dir.join("ca.pem")).unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&made[0].key).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        let again = make(&dir, &["10.0.0.2".into()]).unwrap_err().to_string();
        assert!(again.contains("already exists"), "{again}");
        assert!(make(&dir, &["a b".into()]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
