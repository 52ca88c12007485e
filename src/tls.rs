//! A custom certificate authority (`--ca-file`), trusted by every client: AMQP (`amqps://`),
//! Redis (`rediss://`) and PostgreSQL (`sslmode=verify-ca|verify-full`). TLS itself is
//! chosen by the URLs alone; without a CA file the system's roots are used.

use std::path::Path;

use anyhow::Context;

const PEM_CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----";

/// Reads a PEM bundle of one or more CA certificates.
pub(crate) fn read_ca_pem(path: &Path) -> anyhow::Result<String> {
    let pem = std::fs::read_to_string(path).with_context(|| format!("reading the CA file {}", path.display()))?;
    anyhow::ensure!(pem.contains(PEM_CERTIFICATE), "the CA file {} holds no PEM certificate", path.display());
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        let dir = std::env::temp_dir().join(format!("walletq-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        assert!(read_ca_pem(&empty).unwrap_err().to_string().contains("no PEM certificate"));
        assert!(read_ca_pem(&dir.join("missing.pem")).is_err());
        let good = dir.join("ca.pem");
        std::fs::write(&good, format!("{PEM_CERTIFICATE}\nMIIB\n-----END CERTIFICATE-----\n")).unwrap();
        assert!(read_ca_pem(&good).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
