//! A throwaway certificate authority made with the openssl CLI: a CA, server certificates
//! for loopback and client certificates with a chosen common name, for TLS and mTLS tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A CA's certificate and key, in a directory.
pub struct TestCa {
    dir: PathBuf,
    name: String,
}

/// A certificate and its private key (PEM files).
pub struct Issued {
    /// Certificate.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// Runs the openssl CLI in `dir`; panics with its stderr (or how to install it) on failure.
pub fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}); install it with: apt-get install openssl")
        });
    assert!(status.success(), "openssl {} failed", args.join(" "));
}

impl TestCa {
    /// Creates the CA `name` in `dir` (`{name}-ca.pem`, `{name}-ca.key`).
    pub fn new(dir: &Path, name: &str) -> Self {
        let ca = Self {
            dir: dir.to_owned(),
            name: name.to_owned(),
        };
        let (cert, key) = (ca.file("ca.pem"), ca.file("ca.key"));
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
                "-keyout",
                &key,
                "-out",
                &cert,
                "-subj",
                &format!("/CN={name} test CA"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        ca
    }

    fn file(&self, suffix: &str) -> String {
        self.dir
            .join(format!("{}-{suffix}", self.name))
            .display()
            .to_string()
    }

    /// The CA certificate.
    pub fn cert(&self) -> PathBuf {
        PathBuf::from(self.file("ca.pem"))
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self, name: &str) -> Issued {
        self.issue(
            name,
            "/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\n",
        )
    }

    /// A client certificate with common name `cn` and, if given, a DNS name.
    pub fn client(&self, cn: &str, dns: Option<&str>) -> Issued {
        let mut ext =
            "extendedKeyUsage=clientAuth\nbasicConstraints=critical,CA:FALSE\n".to_owned();
        if let Some(d) = dns {
            ext.push_str(&format!("subjectAltName=DNS:{d}\n"));
        }
        self.issue(cn, &format!("/CN={cn}"), &ext)
    }

    fn issue(&self, name: &str, subject: &str, extensions: &str) -> Issued {
        let (cert, key, csr, ext) = (
            self.file(&format!("{name}.pem")),
            self.file(&format!("{name}.key")),
            self.file(&format!("{name}.csr")),
            self.file(&format!("{name}.ext")),
        );
        std::fs::write(&ext, extensions).expect("write extensions file");
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                subject,
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &self.file("ca.pem"),
                "-CAkey",
                &self.file("ca.key"),
                "-CAcreateserial",
                "-days",
                "1",
                "-out",
                &cert,
                "-extfile",
                &ext,
            ],
        );
        Issued {
            cert: cert.into(),
            key: key.into(),
        }
    }
}
