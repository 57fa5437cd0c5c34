//! Who a connecting client is: the agent's own client (proven by a secret that exists only
//! in this process), a device named by the password file or the shared credentials, or an
//! anonymous client where that is allowed. What the client may then do is the ACL's job
//! (`auth.rs`, applied by the router).
//!
//! Why a per-process secret for the agent: the agent's session is the one whose
//! acknowledgements release the devices' (ack-after-commit), so whoever holds it can make
//! devices drop messages that were never stored. Its client id is predictable
//! (`edgesync-agent-{node}`); the secret is 256 random bits from the OS, generated at every
//! start, handed to the agent's MQTT client in memory and never written anywhere. It costs
//! one constant-time comparison per CONNECT and leaves the agent's tested intake path (a
//! real MQTT client with manual acks) unchanged.

use std::sync::Arc;

use rumqttc::{Connect, ConnectReturnCode};

use edgesync_protocol::secret::constant_time_eq;

use super::auth::PasswordFile;
use super::router::Identity;

/// The username the agent's own client presents (with [`AgentSecret`] as its password).
pub const AGENT_USERNAME: &str = "$edgesync-agent";

/// The agent's proof of identity toward its embedded broker.
#[derive(Clone)]
pub struct AgentSecret(String);

impl std::fmt::Debug for AgentSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentSecret(<redacted>)")
    }
}

impl AgentSecret {
    /// 256 bits from the operating system's random source, hex-encoded.
    ///
    /// # Errors
    /// When the OS random source fails.
    pub fn generate() -> anyhow::Result<Self> {
        use ring::rand::SecureRandom as _;
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| anyhow::anyhow!("the OS random source failed"))?;
        Ok(Self(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// The secret, for the agent's MQTT client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// How clients are authenticated.
#[derive(Debug)]
pub struct Access {
    /// The agent's client id.
    pub agent_client_id: String,
    /// The agent's secret.
    pub agent_secret: AgentSecret,
    /// One username/password shared by all devices (`mqtt.username`/`password`).
    pub shared: Option<(String, edgesync_protocol::secret::Secret)>,
    /// Per-device identities (`broker.password_file`).
    pub passwords: Option<Arc<PasswordFile>>,
}

/// Why a CONNECT was refused, for the log and the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The agent's client id without the agent's secret.
    AgentIdentity,
    /// No or wrong credentials.
    Credentials,
    /// Every password check slot stayed busy until the CONNECT deadline.
    Busy,
}

impl Refusal {
    /// The CONNACK code sent.
    pub fn code(self) -> ConnectReturnCode {
        match self {
            Self::AgentIdentity => ConnectReturnCode::NotAuthorized,
            Self::Credentials => ConnectReturnCode::BadUserNamePassword,
            Self::Busy => ConnectReturnCode::ServiceUnavailable,
        }
    }

    /// What the log says.
    pub fn describe(self) -> &'static str {
        match self {
            Self::AgentIdentity => {
                "the agent's own client id is reserved to the agent (pick another client id)"
            }
            Self::Credentials => {
                "bad or missing username/password (broker.password_file or mqtt.username/password)"
            }
            Self::Busy => {
                "no password check could start in time (broker.max_password_checks; many clients logging in at once)"
            }
        }
    }
}

/// What [`Access::identify`] found: an identity, or a password-file login whose hash must
/// still be checked (costly: see [`PasswordCheck`]).
pub enum Login {
    /// Known without a password-file check.
    Known(Identity),
    /// A username and password to check against the password file.
    Check(PasswordCheck),
}

/// A password-file check, run off the async runtime: PBKDF2 at up to
/// `broker.max_password_iterations` rounds would otherwise hold a runtime worker, and with
/// it every device served by that worker, for as long as a guessing client likes.
pub struct PasswordCheck {
    file: Arc<PasswordFile>,
    username: String,
    password: Vec<u8>,
}

impl PasswordCheck {
    /// Runs the check on the blocking pool, at most `permits` at once; waits for a permit
    /// until `deadline` (`broker.connect_timeout_secs` after the CONNECT came).
    ///
    /// # Errors
    /// [`Refusal::Credentials`] for a wrong password or unknown user (same cost either way),
    /// [`Refusal::Busy`] when no check could start before the deadline.
    pub async fn run(
        self,
        permits: &Arc<tokio::sync::Semaphore>,
        deadline: tokio::time::Instant,
    ) -> Result<Identity, Refusal> {
        let permit = match tokio::time::timeout_at(deadline, permits.clone().acquire_owned()).await
        {
            Ok(Ok(p)) => p,
            _ => return Err(Refusal::Busy),
        };
        let Self {
            file,
            username,
            password,
        } = self;
        let checked = tokio::task::spawn_blocking(move || {
            let ok = file.verify(&username, &password);
            drop(permit);
            ok.then_some(username)
        })
        .await;
        match checked {
            Ok(Some(username)) => Ok(Identity {
                username: Some(Arc::from(username)),
                ..Identity::default()
            }),
            _ => Err(Refusal::Credentials),
        }
    }
}

impl Access {
    /// Identifies `connect`; `certificate` is the name in the client's verified TLS
    /// certificate, on a listener that requires one. Cheap: a password-file login comes back
    /// as a [`Login::Check`] to run off the runtime.
    ///
    /// # Errors
    /// Why it is refused.
    pub fn identify(&self, connect: &Connect, certificate: Option<&str>) -> Result<Login, Refusal> {
        let login = connect.login.as_ref();
        if connect.client_id == self.agent_client_id
            || login.is_some_and(|l| l.username == AGENT_USERNAME)
        {
            let proven = login.is_some_and(|l| {
                constant_time_eq(l.username.as_bytes(), AGENT_USERNAME.as_bytes())
                    & constant_time_eq(l.password.as_bytes(), self.agent_secret.expose().as_bytes())
            }) && connect.client_id == self.agent_client_id;
            return if proven {
                Ok(Login::Known(Identity {
                    is_agent: true,
                    ..Identity::default()
                }))
            } else {
                Err(Refusal::AgentIdentity)
            };
        }
        if let Some(name) = certificate {
            // The certificate is the identity (Mosquitto's use_identity_as_username): the
            // CONNECT's username and password are not consulted.
            return Ok(Login::Known(Identity {
                username: Some(Arc::from(name)),
                ..Identity::default()
            }));
        }
        if self.shared.is_none() && self.passwords.is_none() {
            // No authentication configured: only allowed on loopback or with
            // broker.allow_anonymous (checked when the config was read). An unverified
            // username names nobody, so the ACL treats the client as anonymous.
            return Ok(Login::Known(Identity::default()));
        }
        let Some(login) = login else {
            return Err(Refusal::Credentials);
        };
        let by_shared = self.shared.as_ref().is_some_and(|(user, pass)| {
            constant_time_eq(login.username.as_bytes(), user.as_bytes())
                & pass.matches(login.password.as_bytes())
        });
        if by_shared {
            return Ok(Login::Known(Identity {
                username: Some(Arc::from(login.username.as_str())),
                is_shared: true,
                ..Identity::default()
            }));
        }
        match &self.passwords {
            Some(file) => Ok(Login::Check(PasswordCheck {
                file: file.clone(),
                username: login.username.clone(),
                password: login.password.as_bytes().to_vec(),
            })),
            None => Err(Refusal::Credentials),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use rumqttc::{Login, Protocol};

    use super::*;

    fn connect(id: &str, login: Option<(&str, &str)>) -> Connect {
        Connect {
            protocol: Protocol::V4,
            keep_alive: 30,
            client_id: id.to_owned(),
            clean_session: false,
            last_will: None,
            login: login.map(|(u, p)| Login::new(u, p)),
        }
    }

    impl Access {
        /// The identity, for logins that need no password-file check.
        fn authenticate(
            &self,
            connect: &Connect,
            certificate: Option<&str>,
        ) -> Result<Identity, Refusal> {
            match self.identify(connect, certificate)? {
                super::Login::Known(who) => Ok(who),
                super::Login::Check(_) => panic!("a password-file check"),
            }
        }
    }

    fn access(shared: Option<(&str, &str)>) -> Access {
        Access {
            agent_client_id: "edgesync-agent-n1".into(),
            agent_secret: AgentSecret::generate().unwrap(),
            shared: shared.map(|(u, p)| (u.into(), edgesync_protocol::secret::Secret::new(p))),
            passwords: None,
        }
    }

    #[test]
    fn only_the_secret_opens_the_agents_session() {
        for shared in [None, Some(("dev", "pw"))] {
            let a = access(shared);
            let secret = a.agent_secret.expose().to_owned();
            let agent = a
                .authenticate(
                    &connect("edgesync-agent-n1", Some((AGENT_USERNAME, &secret))),
                    None,
                )
                .unwrap();
            assert!(agent.is_agent);
            for attempt in [
                connect("edgesync-agent-n1", None),
                connect("edgesync-agent-n1", Some(("dev", "pw"))),
                connect("edgesync-agent-n1", Some((AGENT_USERNAME, "guess"))),
                // The secret under another client id does not make an agent either.
                connect("other", Some((AGENT_USERNAME, &secret))),
            ] {
                assert_eq!(a.authenticate(&attempt, None), Err(Refusal::AgentIdentity));
                // A client certificate does not make the agent either.
                assert_eq!(
                    a.authenticate(&attempt, Some("press-7")),
                    Err(Refusal::AgentIdentity)
                );
            }
        }
    }

    #[test]
    fn shared_credentials_name_the_client() {
        let a = access(Some(("dev", "pw")));
        let ok = a
            .authenticate(&connect("m1", Some(("dev", "pw"))), None)
            .unwrap();
        assert_eq!(ok.username.as_deref(), Some("dev"));
        assert!(!ok.is_agent);
        assert_eq!(
            a.authenticate(&connect("m1", Some(("dev", "nope"))), None),
            Err(Refusal::Credentials)
        );
        assert_eq!(
            a.authenticate(&connect("m1", None), None),
            Err(Refusal::Credentials)
        );
        // Without any configured authentication, anyone (loopback or allow_anonymous).
        assert!(
            access(None)
                .authenticate(&connect("m1", None), None)
                .is_ok()
        );
    }

    #[test]
    fn a_certificate_names_the_client_whatever_the_connect_says() {
        let a = access(Some(("dev", "pw")));
        let who = a
            .authenticate(&connect("m1", Some(("other", "wrong"))), Some("press-7"))
            .unwrap();
        assert_eq!(who.username.as_deref(), Some("press-7"));
        assert!(!who.is_agent);
    }
}
