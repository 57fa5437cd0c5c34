//! The token replicas present to each other's internal routes (`live::peer`): 32 random
//! bytes in a Secret next to the Leases (`<lease-name>-peer`, key `token`), made by the
//! first replica to start and read by the others. Only the controller's ServiceAccount (and
//! cluster administrators) can read it.
//!
//! To rotate it: delete the Secret and restart every replica (a rolling restart makes
//! replicas with different tokens refuse each other's reads for its duration: merged reads
//! answer 503 until it ends).

use anyhow::Context as _;
use edgesync_protocol::secret::Secret as Token;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, Client};
use ring::rand::{SecureRandom as _, SystemRandom};

/// The Secret's key.
const KEY: &str = "token";

/// The Secret's name for the Lease group `lease_name`.
pub fn secret_name(lease_name: &str) -> String {
    format!("{lease_name}-peer")
}

/// Reads the group's token, making it first when no replica has.
///
/// # Errors
/// When the Secret can be neither read nor created (RBAC: `get` and `create` on Secrets in
/// the Leases' namespace), or holds no usable token.
pub async fn get_or_create(
    client: Client,
    namespace: &str,
    lease_name: &str,
) -> anyhow::Result<Token> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let name = secret_name(lease_name);
    let hint = || {
        format!(
            "the replicas' shared token, Secret {namespace}/{name}: the controller needs get and create on Secrets in {namespace} (deploy/ grants them)"
        )
    };
    if let Some(secret) = api.get_opt(&name).await.with_context(hint)? {
        return token_of(&secret).with_context(hint);
    }
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    let value: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(
                [(
                    "app.kubernetes.io/name".to_owned(),
                    "edgesync-controller".to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        string_data: Some([(KEY.to_owned(), value)].into()),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(created) => token_of(&created).with_context(hint),
        // Another replica made it first: theirs is the group's.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let secret = api.get(&name).await.with_context(hint)?;
            token_of(&secret).with_context(hint)
        }
        Err(e) => Err(e).with_context(hint),
    }
}

fn token_of(secret: &Secret) -> anyhow::Result<Token> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(KEY))
        .context("the Secret has no `token` key")?;
    anyhow::ensure!(
        bytes.0.len() >= 32,
        "the Secret's token is shorter than 32 bytes"
    );
    let text = String::from_utf8(bytes.0.clone()).context("the Secret's token is not text")?;
    anyhow::ensure!(
        text.bytes().all(|b| b.is_ascii_graphic()),
        "the Secret's token holds spaces or control characters (a trailing newline?): delete the Secret and restart the replicas to make a new one"
    );
    Ok(Token::new(text))
}
