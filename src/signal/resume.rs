//! Resume tokens: opaque to clients, signed with a key derived from the cluster secret so that any
//! node of the cluster can check one. A token names the viewer session, its room and identity;
//! whether it still resumes anything is the store's viewer state to say (the resume window).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// A token longer than this is refused before it is decoded.
pub const RESUME_TOKEN_BYTES_MAX: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeClaims {
    pub viewer: String,
    pub room: String,
    pub identity: String,
}

#[derive(Clone)]
pub struct ResumeKeys {
    key: [u8; 32],
}

impl ResumeKeys {
    pub fn new(cluster_secret: &str) -> Self {
        let key = Sha256::digest(format!("mediamesh-resume:v1:{cluster_secret}").as_bytes()).into();
        Self { key }
    }

    fn mac(&self, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        mac.update(payload);
        mac
    }

    pub fn sign(&self, claims: &ResumeClaims) -> String {
        let payload = format!("{}\n{}\n{}", claims.viewer, claims.room, claims.identity);
        let signature = self.mac(payload.as_bytes()).finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload.as_bytes()),
            URL_SAFE_NO_PAD.encode(signature)
        )
    }

    /// The claims of a token this cluster signed; `Err` with the reason otherwise.
    pub fn verify(&self, token: &str) -> Result<ResumeClaims, &'static str> {
        if token.len() > RESUME_TOKEN_BYTES_MAX {
            return Err("resume token too long");
        }
        let (payload, signature) = token.split_once('.').ok_or("malformed resume token")?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| "malformed resume token")?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| "malformed resume token")?;
        self.mac(&payload)
            .verify_slice(&signature)
            .map_err(|_| "resume token not signed by this cluster")?;
        let payload = String::from_utf8(payload).map_err(|_| "malformed resume token")?;
        let mut parts = payload.splitn(3, '\n');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(viewer), Some(room), Some(identity)) => Ok(ResumeClaims {
                viewer: viewer.to_string(),
                room: room.to_string(),
                identity: identity.to_string(),
            }),
            _ => Err("malformed resume token"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_refuses_forgeries() {
        let keys = ResumeKeys::new("cluster-secret");
        let claims = ResumeClaims {
            viewer: "v1".into(),
            room: "live.room".into(),
            identity: "김민수".into(),
        };
        let token = keys.sign(&claims);
        assert_eq!(keys.verify(&token), Ok(claims.clone()));
        assert!(ResumeKeys::new("other-cluster").verify(&token).is_err());
        let (payload, signature) = token.split_once('.').unwrap();
        let forged_payload = URL_SAFE_NO_PAD.encode("v2\nlive.room\n김민수");
        assert!(keys.verify(&format!("{forged_payload}.{signature}")).is_err());
        assert!(keys.verify(payload).is_err());
        assert!(keys.verify("").is_err());
        assert!(keys.verify(&"a".repeat(RESUME_TOKEN_BYTES_MAX + 1)).is_err());
    }
}
