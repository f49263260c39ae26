//! Grants: a site backend's signed yes to one credit, which the hub requires for a page's
//! positive delta. The client never verifies a grant (the hub does, with the site's key) and
//! never mints one; it reads the op id the grant names, keeps the grant with that op and
//! sends it along.

use alloc::string::String;

/// A grant for one credit: a compact JWS whose payload names the op (`op_id`), the user, the
/// data type and the exact amounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub(crate) jwt: String,
    /// The op's id, chosen by the site's backend: the op that carries this grant takes it, so
    /// the grant credits that op once and no other.
    pub(crate) op_id: String,
}

impl Grant {
    /// A grant whose `op_id` claim the caller has read already (the browser shell reads it in
    /// JavaScript, which costs the package less than a decoder here).
    pub fn new(jwt: impl Into<String>, op_id: impl Into<String>) -> Grant {
        Grant { jwt: jwt.into(), op_id: op_id.into() }
    }

    /// Reads the `op_id` claim from the JWT's payload (base64url JSON). Checks neither the
    /// signature nor the expiry: that is the hub's job.
    pub fn from_jwt(jwt: &str) -> Option<Grant> {
        use base64::Engine as _;
        let mut parts = jwt.split('.');
        let (Some(_header), Some(payload), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
        let claims: serde_json::Value = serde_json::from_slice(&payload).ok()?;
        let op_id = claims.get("op_id")?.as_str().filter(|id| !id.is_empty())?;
        Some(Grant::new(jwt, op_id))
    }

    pub fn jwt(&self) -> &str {
        &self.jwt
    }

    pub fn op_id(&self) -> &str {
        &self.op_id
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    fn jwt(claims: &str) -> String {
        let encode = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        [encode(r#"{"alg":"HS256","typ":"grant+jwt"}"#), encode(claims), "c2ln".into()].join(".")
    }

    #[test]
    fn a_grant_names_the_op_id_its_payload_carries() {
        let text =
            jwt(r#"{"sub":"8-evans","op_id":"0193-claim","data_type":"balance","delta":{"coins":10}}"#);
        let grant = Grant::from_jwt(&text).unwrap();
        assert_eq!(grant.op_id(), "0193-claim");
        assert_eq!(grant.jwt(), text);
    }

    #[test]
    fn text_that_is_not_a_jwt_naming_an_op_id_is_no_grant() {
        assert_eq!(Grant::from_jwt("not a jwt"), None);
        assert_eq!(Grant::from_jwt(&jwt(r#"{"sub":"8-evans"}"#)), None);
        assert_eq!(Grant::from_jwt(&jwt(r#"{"op_id":""}"#)), None);
        assert_eq!(Grant::from_jwt(&jwt(r#"{"op_id":7}"#)), None);
        assert_eq!(Grant::from_jwt("a.!!!.c"), None);
        assert_eq!(Grant::from_jwt(&[jwt(r#"{"op_id":"x"}"#), "d".into()].join(".")), None);
    }
}
