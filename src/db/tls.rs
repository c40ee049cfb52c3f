//! TLS to PostgreSQL, by libpq's conventions, so that a URL that works with `psql` works
//! with relocator: `sslmode` (disable, allow, prefer — the default —, require, verify-ca,
//! verify-full), `sslrootcert` (a CA file, or `system` for the platform's roots; default
//! `~/.postgresql/root.crt`), `sslcert` + `sslkey` (a client certificate), in the URL's
//! query or a key=value string, or from `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`,
//! `PGSSLKEY`. tokio-postgres knows only disable/prefer/require, so these settings are
//! taken out of the connection string here and carried out with rustls (the TLS stack
//! the S3 client already uses: no system OpenSSL needed to build).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::ConfigError;

/// The connection-string keys this module takes out.
const KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// libpq tries a plain connection first; relocator (like tokio-postgres) tries TLS
    /// first, as `prefer`.
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, ConfigError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConfigError(format!(
                    "sslmode={other:?} is not one of disable, allow, prefer, require, \
                     verify-ca, verify-full (as libpq)"
                )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// Where the CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    /// `sslrootcert=system`: the platform's trusted roots.
    System,
}

/// The TLS settings of one connection string, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// `None`: no CA given and no `~/.postgresql/root.crt`.
    pub root_cert: Option<RootCert>,
    /// (certificate, key) files.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Split the TLS settings off a connection string (URL or key=value form): the string
/// tokio-postgres is given, and the settings. The environment fills in what the string
/// does not say, as for libpq.
pub fn split(conn: &str) -> Result<(String, TlsSettings), ConfigError> {
    split_with(conn, &|k| std::env::var(k).ok(), home().as_deref())
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

fn split_with(
    conn: &str,
    env: &dyn Fn(&str) -> Option<String>,
    home: Option<&Path>,
) -> Result<(String, TlsSettings), ConfigError> {
    let (rest, found) = if conn.contains("://") {
        split_url(conn)
    } else {
        split_key_values(conn)
    };
    // As libpq: a key given twice takes its last value.
    let get = |key: &str, var: &str| {
        found
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .or_else(|| env(var).filter(|v| !v.is_empty()))
    };
    let mode = get("sslmode", "PGSSLMODE");
    let root = get("sslrootcert", "PGSSLROOTCERT");
    let (cert, key) = (get("sslcert", "PGSSLCERT"), get("sslkey", "PGSSLKEY"));
    let root_cert = match root.as_deref() {
        Some("system") => Some(RootCert::System),
        Some(file) => Some(RootCert::File(PathBuf::from(file))),
        None => home
            .map(|h| h.join(".postgresql/root.crt"))
            .filter(|p| p.is_file())
            .map(RootCert::File),
    };
    let mode = match mode.as_deref() {
        Some(m) => SslMode::parse(m)?,
        // libpq: with sslrootcert=system the default becomes verify-full.
        None if root_cert == Some(RootCert::System) => SslMode::VerifyFull,
        None => SslMode::Prefer,
    };
    if root_cert == Some(RootCert::System) && mode != SslMode::VerifyFull {
        return Err(ConfigError(format!(
            "sslrootcert=system needs sslmode=verify-full (not {}), as libpq: the \
             platform's roots trust any public name, so only the host name check makes \
             them mean something",
            mode.as_str()
        )));
    }
    // libpq: `require` with a CA file given (or the default one present) verifies the
    // chain, as verify-ca.
    let mode = match (mode, &root_cert) {
        (SslMode::Require, Some(RootCert::File(_))) => SslMode::VerifyCa,
        (m, _) => m,
    };
    if mode.verifies() && root_cert.is_none() {
        return Err(ConfigError(format!(
            "sslmode={} checks the server's certificate, but no CA is given: set \
             sslrootcert=FILE (the CA that signed the server's certificate, e.g. your \
             provider's bundle), or sslrootcert=system for the platform's roots",
            mode.as_str()
        )));
    }
    if let Some(RootCert::File(f)) = &root_cert {
        if mode != SslMode::Disable && !f.is_file() {
            return Err(ConfigError(format!(
                "sslrootcert {} is not a readable file; give the CA certificate's path",
                f.display()
            )));
        }
    }
    let client_cert = match (cert, key) {
        (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
        (None, None) => None,
        _ => {
            return Err(ConfigError(
                "sslcert and sslkey go together: give both (the client certificate and its \
                 key) or neither"
                    .into(),
            ))
        }
    };
    Ok((
        rest,
        TlsSettings {
            mode,
            root_cert,
            client_cert,
        },
    ))
}

/// URL form: take the TLS keys out of the query string, keep the rest as it was.
fn split_url(conn: &str) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = conn.split_once('?') else {
        return (conn.to_owned(), Vec::new());
    };
    let mut found = Vec::new();
    let mut kept = Vec::new();
    let decode = |x: &str| {
        percent_encoding::percent_decode_str(x)
            .decode_utf8_lossy()
            .into_owned()
    };
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        // libpq decodes keys too: `%73slmode` is sslmode.
        let k = decode(k);
        if KEYS.contains(&k.as_str()) {
            found.push((k, decode(v)));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, found)
}

/// key=value form, parsed as libpq does (spaces around `=`, single-quoted values with
/// `\'` and `\\` escapes): take out the TLS keys, keep every other pair as it was
/// written — a quoted password with spaces in it stays whole, and is never taken for a
/// key.
fn split_key_values(conn: &str) -> (String, Vec<(String, String)>) {
    let mut found = Vec::new();
    let mut kept: Vec<&str> = Vec::new();
    let chars: Vec<(usize, char)> = conn.char_indices().collect();
    let end = conn.len();
    let at = |i: usize| chars.get(i).map(|&(b, _)| b).unwrap_or(end);
    let mut i = 0;
    while i < chars.len() {
        while i < chars.len() && chars[i].1.is_whitespace() {
            i += 1;
        }
        if i >= chars.len() {
            break;
        }
        let start = i;
        let key_start = at(i);
        while i < chars.len() && chars[i].1 != '=' && !chars[i].1.is_whitespace() {
            i += 1;
        }
        let key = &conn[key_start..at(i)];
        while i < chars.len() && chars[i].1.is_whitespace() {
            i += 1;
        }
        if i < chars.len() && chars[i].1 == '=' {
            i += 1;
        }
        while i < chars.len() && chars[i].1.is_whitespace() {
            i += 1;
        }
        let mut value = String::new();
        if i < chars.len() && chars[i].1 == '\'' {
            i += 1;
            while i < chars.len() && chars[i].1 != '\'' {
                if chars[i].1 == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                value.push(chars[i].1);
                i += 1;
            }
            i += 1; // the closing quote
        } else {
            while i < chars.len() && !chars[i].1.is_whitespace() {
                if chars[i].1 == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                value.push(chars[i].1);
                i += 1;
            }
        }
        if KEYS.contains(&key) {
            found.push((key.to_owned(), value));
        } else {
            kept.push(&conn[at(start)..at(i.min(chars.len()))]);
        }
    }
    (kept.join(" "), found)
}

impl TlsSettings {
    /// What tokio-postgres is told: whether to ask for TLS, and whether it may do
    /// without.
    pub fn pg_mode(&self) -> PgSslMode {
        match self.mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Allow | SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        }
    }

    /// Whether the server's certificate chain is checked: verify-ca and verify-full, and,
    /// as in libpq, any mode that uses TLS once a CA file is given (or
    /// `~/.postgresql/root.crt` exists).
    pub fn checks_chain(&self) -> bool {
        self.mode.verifies()
            || (self.mode != SslMode::Disable && matches!(self.root_cert, Some(RootCert::File(_))))
    }

    /// The TLS connector for these settings.
    pub fn connector(&self) -> Result<MakeRustlsConnect, ConfigError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError(format!("TLS to PostgreSQL: {e}")))?;
        let verifier: Arc<dyn ServerCertVerifier> = match &self.root_cert {
            Some(root) if self.checks_chain() => {
                let roots = Arc::new(self.roots(root)?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| ConfigError(format!("sslrootcert: {e}")))?;
                if self.mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
            // Encrypted, not checked (libpq's allow/prefer/require without a CA file).
            _ => Arc::new(Unchecked(provider)),
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match &self.client_cert {
            Some((cert, key)) => {
                let certs = CertificateDer::pem_file_iter(cert)
                    .and_then(|c| c.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        ConfigError(format!("sslcert {}: cannot read it: {e}", cert.display()))
                    })?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    ConfigError(format!("sslkey {}: cannot read it: {e}", key.display()))
                })?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| ConfigError(format!("sslcert/sslkey: {e}")))?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(MakeRustlsConnect::new(config))
    }

    fn roots(&self, root: &RootCert) -> Result<rustls::RootCertStore, ConfigError> {
        let mut store = rustls::RootCertStore::empty();
        match root {
            RootCert::File(f) => {
                let certs = CertificateDer::pem_file_iter(f)
                    .and_then(|c| c.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        ConfigError(format!("sslrootcert {}: cannot read it: {e}", f.display()))
                    })?;
                let (added, _) = store.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(ConfigError(format!(
                        "sslrootcert {} holds no usable CA certificate (PEM expected)",
                        f.display()
                    )));
                }
            }
            RootCert::System => {
                let found = rustls_native_certs::load_native_certs();
                store.add_parsable_certificates(found.certs);
                if store.is_empty() {
                    return Err(ConfigError(
                        "sslrootcert=system: the platform has no trusted roots installed \
                         (on Debian: the ca-certificates package)"
                            .into(),
                    ));
                }
            }
        }
        Ok(store)
    }

    /// A connection failure explained with the setting to change, where it is a TLS
    /// matter; `None` otherwise.
    pub fn explain(&self, err: &str) -> Option<String> {
        let root = match &self.root_cert {
            Some(RootCert::File(f)) => format!("sslrootcert={}", f.display()),
            Some(RootCert::System) => "sslrootcert=system".into(),
            None => "sslrootcert".into(),
        };
        if err.contains("UnknownIssuer") || err.contains("BadSignature") {
            Some(format!(
                "the server's certificate is not signed by the CA in {root}: set sslrootcert \
                 to the CA that signed it"
            ))
        } else if err.contains("NotValidForName") {
            Some(format!(
                "the server's certificate does not name the host connected to \
                 (sslmode={}): connect by a host name on the certificate, or use \
                 sslmode=verify-ca to check the CA only",
                self.mode.as_str()
            ))
        } else if err.contains("Expired") || err.contains("NotValidYet") {
            Some("the server's certificate is expired or not valid yet".into())
        } else if err.contains("no encryption") {
            Some(format!(
                "the server accepts only TLS connections (sslmode={}): set sslmode=require, \
                 or verify-full with sslrootcert",
                self.mode.as_str()
            ))
        } else if err.contains("server does not support TLS") {
            Some(format!(
                "the server does not offer TLS (sslmode={}): ask for it on the server, or \
                 set sslmode=prefer",
                self.mode.as_str()
            ))
        } else {
            None
        }
    }
}

/// verify-ca: the chain must lead to the CA; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// prefer/require: encrypted, the certificate not checked (libpq's meaning of them);
/// the handshake's signatures still are.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_env(conn: &str, vars: &[(&str, &str)]) -> Result<(String, TlsSettings), ConfigError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        split_with(
            conn,
            &move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
            None,
        )
    }

    #[test]
    fn tls_keys_are_taken_out_of_urls_and_key_value_strings() {
        let ca = std::env::temp_dir().join("relocator-pg-tls-unit-ca.crt");
        std::fs::write(&ca, "x").unwrap();
        let url = format!(
            "postgres://u:p@db:5432/app?application_name=r&sslmode=verify-full&sslrootcert={}",
            ca.display()
        );
        let (rest, s) = split_env(&url, &[]).unwrap();
        assert_eq!(rest, "postgres://u:p@db:5432/app?application_name=r");
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert, Some(RootCert::File(ca.clone())));
        let (rest, s) = split_env(
            &format!(
                "host=db user=u sslmode=require sslrootcert={}",
                ca.display()
            ),
            &[],
        )
        .unwrap();
        assert_eq!(rest, "host=db user=u");
        assert_eq!(
            s.mode,
            SslMode::VerifyCa,
            "require with a CA file verifies, as libpq"
        );
        let (rest, s) = split_env("postgres://u@db/app", &[]).unwrap();
        assert_eq!(
            (rest.as_str(), s.mode),
            ("postgres://u@db/app", SslMode::Prefer)
        );
        let (_, s) = split_env("postgres://u@db/app", &[("PGSSLMODE", "disable")]).unwrap();
        assert_eq!(s.mode, SslMode::Disable);
        let (_, s) = split_env(
            "postgres://u@db/app?sslmode=require",
            &[("PGSSLMODE", "disable")],
        )
        .unwrap();
        assert_eq!(
            s.mode,
            SslMode::Require,
            "the string wins over the environment"
        );
        let (_, s) = split_env("postgres://u@db/app?sslrootcert=system", &[]).unwrap();
        assert_eq!(s.mode, SslMode::VerifyFull);
        // As libpq: the last of a repeated key, keys percent-decoded, spaces around `=`,
        // quoted values whole (a password with spaces is never read as a key).
        let (_, s) = split_env("postgres://u@db/app?sslmode=disable&sslmode=require", &[]).unwrap();
        assert_eq!(s.mode, SslMode::Require);
        let (rest, s) = split_env("postgres://u@db/app?%73slmode=require", &[]).unwrap();
        assert_eq!(
            (rest.as_str(), s.mode),
            ("postgres://u@db/app", SslMode::Require)
        );
        let (rest, s) = split_env(
            r"host=db password='a sslmode=disable \' b' sslmode = 'require' user=u",
            &[],
        )
        .unwrap();
        assert_eq!(s.mode, SslMode::Require);
        assert_eq!(rest, r"host=db password='a sslmode=disable \' b' user=u");
        // A CA file makes prefer check the chain, as libpq does.
        let (_, s) = split_env(
            &format!("postgres://u@db/app?sslrootcert={}", ca.display()),
            &[],
        )
        .unwrap();
        assert_eq!(s.mode, SslMode::Prefer);
        assert!(s.checks_chain());
        std::fs::remove_file(&ca).unwrap();
    }

    #[test]
    fn settings_that_cannot_work_name_the_setting() {
        for (conn, needle) in [
            (
                "postgres://u@db/app?sslmode=verify-all",
                "sslmode=\"verify-all\"",
            ),
            ("postgres://u@db/app?sslmode=verify-full", "set sslrootcert"),
            (
                "postgres://u@db/app?sslmode=require&sslrootcert=system",
                "sslmode=verify-full",
            ),
            (
                "postgres://u@db/app?sslmode=verify-ca&sslrootcert=/nonexistent/ca.crt",
                "sslrootcert /nonexistent/ca.crt is not a readable file",
            ),
            (
                "postgres://u@db/app?sslcert=/c.crt",
                "sslcert and sslkey go together",
            ),
        ] {
            let err = split_env(conn, &[]).unwrap_err().to_string();
            assert!(err.contains(needle), "{conn}: {err}");
        }
    }
}
