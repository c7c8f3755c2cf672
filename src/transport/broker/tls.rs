//! The TLS listener's certificates: read and checked the same way by `check`, at
//! start (mqtt5 reads its own copy there) and on SIGHUP, when a renewed certificate
//! replaces the one in force without a restart (vendor/mqtt5's `TlsAcceptorHandle`).

use std::path::Path;

use mqtt5::broker::tls_acceptor::TlsAcceptorConfig;
use mqtt5::broker::TlsAcceptorHandle;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Embedded;

/// The listener's rustls configuration from `cert_file`, `key_file` and
/// `client_ca_file`, as mqtt5 builds it at start (a key that is not the
/// certificate's is refused there). `None` without `tls_listen`. An error names the
/// key at fault. `check` builds it to refuse bad files; SIGHUP serves it.
pub fn server_config(
    config: &Embedded,
) -> Result<Option<rustls::ServerConfig>, (&'static str, String)> {
    if config.tls_listen.is_none() {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else {
        return Err((
            "cert_file",
            "tls_listen needs cert_file and key_file".into(),
        ));
    };
    let chain = certificates(cert).map_err(|why| ("cert_file", why))?;
    let private = private_key(key).map_err(|why| ("key_file", why))?;
    let mut settings = TlsAcceptorConfig::new(chain, private);
    if let Some(ca) = &config.client_ca_file {
        let roots = certificates(ca).map_err(|why| ("client_ca_file", why))?;
        settings = settings
            .with_client_ca_certs(roots)
            .with_require_client_cert(true);
    }
    settings.build_server_config().map(Some).map_err(|e| {
        (
            "key_file",
            format!("{} with {}: {e}", cert.display(), key.display()),
        )
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{}: no PEM private key ({e})", path.display()))
}

/// The TLS listener as it started: what SIGHUP may replace (certificate, key, client
/// CA) and what it may not (the address, and whether clients need certificates).
#[derive(Clone)]
pub struct Listener {
    pub handle: TlsAcceptorHandle,
    /// `client_ca_file` was set: clients must show a certificate.
    pub mutual: bool,
    /// `tls_listen` as configured (port 0 included).
    pub configured: std::net::SocketAddr,
}

impl Listener {
    /// Checks what `config` asks of the TLS listener against how it started; a change
    /// that needs a restart is refused.
    pub fn check_unchanged(this: Option<&Listener>, config: &Embedded) -> Result<(), String> {
        match (this, config.tls_listen) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err("tls_listen added: restart the daemon to apply".into()),
            (Some(_), None) => Err("tls_listen removed: restart the daemon to apply".into()),
            (Some(l), Some(addr)) if addr != l.configured => Err(format!(
                "tls_listen changed from {} to {addr}: restart the daemon to apply",
                l.configured
            )),
            (Some(l), Some(_)) if l.mutual != config.client_ca_file.is_some() => Err(
                "client_ca_file added or removed: restart the daemon to apply (certificates are replaced live, whether clients need one is not)"
                    .into(),
            ),
            (Some(_), Some(_)) => Ok(()),
        }
    }
}
