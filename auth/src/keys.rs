//! Keys: loading configured keys and JWKS documents into verification keys, each pinned
//! to exactly one algorithm. Key material is checked here (parsable, long enough, on the
//! curve), so that a bad key is a configuration error rather than a token failure.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey};
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::traits::PublicKeyParts;
use serde_json::Value;

use crate::AuthConfigError;
use crate::config::KeyConfig;

/// Algorithms roomcast accepts (spec section 6).
pub const SUPPORTED: [Algorithm; 6] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
];

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Most keys taken from one JWKS document.
pub const MAX_JWKS_KEYS: usize = 100;

/// The JOSE name of an algorithm.
pub fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::EdDSA => "EdDSA",
        _ => "unsupported",
    }
}

/// A supported algorithm by its exact JOSE name (case-sensitive, as RFC 7518 has it).
pub fn parse_alg(name: &str) -> Option<Algorithm> {
    SUPPORTED.into_iter().find(|a| alg_name(*a) == name)
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// RFC 7518 section 3.2: an HMAC key at least as long as the hash output.
fn min_secret_len(alg: Algorithm) -> usize {
    match alg {
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => 32,
    }
}

/// A verification key pinned to one algorithm.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("kid", &self.kid).field("alg", &self.alg).finish_non_exhaustive()
    }
}

fn bad(field: &str, message: impl Into<String>) -> AuthConfigError {
    AuthConfigError { field: field.to_string(), message: message.into() }
}

/// An HMAC key from secret bytes, refusing short secrets and anything that looks like a
/// public key (the HS/RS confusion: a public key must never serve as an HMAC secret).
pub fn hmac_key(field: &str, alg: Algorithm, secret: &[u8]) -> Result<Key, AuthConfigError> {
    if !is_hmac(alg) {
        return Err(bad(field, format!("a secret is for HS256/HS384/HS512, not {}", alg_name(alg))));
    }
    let min = min_secret_len(alg);
    if secret.len() < min {
        return Err(bad(field, format!("an {} secret needs at least {min} bytes", alg_name(alg))));
    }
    let text = String::from_utf8_lossy(secret);
    if text.contains("-----BEGIN") || text.trim_start().starts_with("{\"k") {
        return Err(bad(
            field,
            "this looks like a PEM or JWK key, not an HMAC secret; give it with `pem`/`file` and an asymmetric algorithm",
        ));
    }
    Ok(Key { kid: None, alg, key: DecodingKey::from_secret(secret) })
}

/// A public key from PEM text, checked.
pub fn pem_key(field: &str, alg: Algorithm, pem: &[u8]) -> Result<Key, AuthConfigError> {
    let text = String::from_utf8_lossy(pem);
    if text.contains("PRIVATE KEY") {
        return Err(bad(field, "this is a private key; configure the public key only"));
    }
    let key = match alg {
        Algorithm::RS256 => DecodingKey::from_rsa_pem(pem),
        Algorithm::ES256 => DecodingKey::from_ec_pem(pem),
        Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
        a if is_hmac(a) => {
            return Err(bad(
                field,
                format!("{} takes `secret`, `secret_base64` or a secret `file`, not a PEM key", alg_name(a)),
            ));
        }
        a => return Err(bad(field, format!("unsupported algorithm {}", alg_name(a)))),
    }
    .map_err(|e| bad(field, format!("not a valid {} public key PEM: {e}", alg_name(alg))))?;
    check_public_key(field, alg, &key)?;
    Ok(Key { kid: None, alg, key })
}

/// Checks asymmetric key material: RSA modulus size, P-256 point on the curve, Ed25519
/// point valid.
fn check_public_key(field: &str, alg: Algorithm, key: &DecodingKey) -> Result<(), AuthConfigError> {
    match alg {
        Algorithm::RS256 => {
            let bits = match key.kind() {
                jsonwebtoken::DecodingKeyKind::SecretOrDer(der) => rsa::RsaPublicKey::from_pkcs1_der(der)
                    .map_err(|e| bad(field, format!("invalid RSA public key: {e}")))?
                    .n()
                    .bits(),
                jsonwebtoken::DecodingKeyKind::RsaModulusExponent { n, e } => {
                    rsa::RsaPublicKey::new(rsa::BigUint::from_bytes_be(n), rsa::BigUint::from_bytes_be(e))
                        .map_err(|e| bad(field, format!("invalid RSA public key: {e}")))?
                        .n()
                        .bits()
                }
            };
            if bits < MIN_RSA_BITS {
                return Err(bad(
                    field,
                    format!("RSA key of {bits} bits; at least {MIN_RSA_BITS} are required"),
                ));
            }
        }
        Algorithm::ES256 => {
            let bytes = key.try_get_as_bytes().map_err(|e| bad(field, e.to_string()))?;
            p256::PublicKey::from_sec1_bytes(bytes)
                .map_err(|_| bad(field, "not a valid P-256 public key"))?;
        }
        Algorithm::EdDSA => {
            let bytes = key.try_get_as_bytes().map_err(|e| bad(field, e.to_string()))?;
            let arr: [u8; 32] = bytes
                .try_into()
                .map_err(|_| bad(field, "not an Ed25519 public key (Ed448 is not supported)"))?;
            ed25519_dalek::VerifyingKey::from_bytes(&arr)
                .map_err(|_| bad(field, "not a valid Ed25519 public key"))?;
        }
        _ => {}
    }
    Ok(())
}

/// Loads one `[[auth.keys]]` entry.
pub fn load_key(index: usize, kc: &KeyConfig) -> Result<Key, AuthConfigError> {
    let field = format!("auth.keys[{index}]");
    let alg = parse_alg(&kc.algorithm).ok_or_else(|| {
        bad(
            &format!("{field}.algorithm"),
            format!(
                "unsupported algorithm {:?} (use HS256, HS384, HS512, RS256, ES256 or EdDSA)",
                kc.algorithm
            ),
        )
    })?;
    let given = [kc.secret.is_some(), kc.secret_base64.is_some(), kc.pem.is_some(), kc.file.is_some()];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(bad(&field, "give exactly one of `secret`, `secret_base64`, `pem`, `file`"));
    }
    let mut key = if let Some(s) = &kc.secret {
        hmac_key(&format!("{field}.secret"), alg, s.as_bytes())?
    } else if let Some(b) = &kc.secret_base64 {
        let bytes = STANDARD
            .decode(b.trim())
            .or_else(|_| URL_SAFE_NO_PAD.decode(b.trim().trim_end_matches('=')))
            .map_err(|e| bad(&format!("{field}.secret_base64"), format!("not base64: {e}")))?;
        hmac_key(&format!("{field}.secret_base64"), alg, &bytes)?
    } else if let Some(p) = &kc.pem {
        pem_key(&format!("{field}.pem"), alg, p.as_bytes())?
    } else if let Some(path) = &kc.file {
        let ff = format!("{field}.file");
        let bytes =
            std::fs::read(path).map_err(|e| bad(&ff, format!("cannot read {}: {e}", path.display())))?;
        if is_hmac(alg) {
            let text = String::from_utf8_lossy(&bytes);
            hmac_key(&ff, alg, text.trim().as_bytes())?
        } else {
            pem_key(&ff, alg, &bytes)?
        }
    } else {
        return Err(bad(&field, "no key given"));
    };
    if let Some(kid) = &kc.kid
        && kid.is_empty()
    {
        return Err(bad(&format!("{field}.kid"), "must not be empty"));
    }
    key.kid = kc.kid.clone();
    Ok(key)
}

/// The keys of a JWKS document usable with `allowed` algorithms. Keys for encryption
/// (`use: enc`), symmetric keys (`kty: oct`: secrets never travel in a JWKS) and keys of
/// unsupported types are skipped with a warning; a document that is not a JWKS at all is
/// an error.
pub fn parse_jwks(source: &str, body: &[u8], allowed: &[Algorithm]) -> Result<Vec<Key>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let Some(list) = doc.get("keys").and_then(Value::as_array) else {
        return Err("no `keys` array".into());
    };
    let mut out = Vec::new();
    for (i, jwk) in list.iter().enumerate() {
        if out.len() >= MAX_JWKS_KEYS {
            tracing::warn!(%source, "JWKS has more than {MAX_JWKS_KEYS} keys; the rest are ignored");
            break;
        }
        match jwk_key(jwk) {
            Ok(Some(k)) if allowed.contains(&k.alg) => out.push(k),
            Ok(Some(k)) => {
                tracing::debug!(%source, index = i, alg = alg_name(k.alg), "JWKS key for an algorithm not allowed; skipped")
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(%source, index = i, error = %e, "JWKS key skipped"),
        }
    }
    Ok(out)
}

fn jwk_key(jwk: &Value) -> Result<Option<Key>, String> {
    let s = |name: &str| jwk.get(name).and_then(Value::as_str);
    if s("use").is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    let kty = s("kty").ok_or("no kty")?;
    let kid = s("kid").map(str::to_string);
    let declared = match s("alg") {
        Some(name) => Some(parse_alg(name).ok_or_else(|| format!("unsupported alg {name:?}"))?),
        None => None,
    };
    let (alg, key) = match kty {
        "RSA" => {
            let (n, e) = (s("n").ok_or("RSA key without n")?, s("e").ok_or("RSA key without e")?);
            (Algorithm::RS256, DecodingKey::from_rsa_components(n, e).map_err(|e| e.to_string())?)
        }
        "EC" => {
            if s("crv") != Some("P-256") {
                return Err(format!("unsupported curve {:?}", s("crv")));
            }
            let (x, y) = (s("x").ok_or("EC key without x")?, s("y").ok_or("EC key without y")?);
            (Algorithm::ES256, DecodingKey::from_ec_components(x, y).map_err(|e| e.to_string())?)
        }
        "OKP" => {
            if s("crv") != Some("Ed25519") {
                return Err(format!("unsupported curve {:?}", s("crv")));
            }
            (
                Algorithm::EdDSA,
                DecodingKey::from_ed_components(s("x").ok_or("OKP key without x")?)
                    .map_err(|e| e.to_string())?,
            )
        }
        "oct" => return Err("symmetric (oct) keys are not accepted from a JWKS".into()),
        other => return Err(format!("unsupported kty {other:?}")),
    };
    if let Some(d) = declared
        && d != alg
    {
        return Err(format!("alg {} does not fit kty {kty}", alg_name(d)));
    }
    check_public_key("jwks", alg, &key).map_err(|e| e.message)?;
    Ok(Some(Key { kid, alg, key }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_exact() {
        assert_eq!(parse_alg("HS256"), Some(Algorithm::HS256));
        assert_eq!(parse_alg("EdDSA"), Some(Algorithm::EdDSA));
        for name in ["none", "None", "hs256", "RS384", "PS256", "ES384", ""] {
            assert_eq!(parse_alg(name), None, "{name}");
        }
    }

    #[test]
    fn hmac_secrets_are_checked() {
        assert!(hmac_key("s", Algorithm::HS256, &[7; 32]).is_ok());
        assert!(hmac_key("s", Algorithm::HS256, &[7; 31]).unwrap_err().message.contains("32"));
        assert!(hmac_key("s", Algorithm::HS512, &[7; 63]).is_err());
        let pem = include_str!("../../tests/keys/rsa_public.pem");
        assert!(hmac_key("s", Algorithm::HS256, pem.as_bytes()).unwrap_err().message.contains("PEM"));
        assert!(hmac_key("s", Algorithm::RS256, &[7; 32]).is_err());
    }

    #[test]
    fn pem_keys_are_checked() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/keys/");
        let read = |f: &str| std::fs::read(format!("{dir}{f}")).unwrap();
        assert!(pem_key("k", Algorithm::RS256, &read("rsa_public.pem")).is_ok());
        assert!(pem_key("k", Algorithm::ES256, &read("ec_public.pem")).is_ok());
        assert!(pem_key("k", Algorithm::EdDSA, &read("ed25519_public.pem")).is_ok());
        let err = |alg, f: &str| pem_key("k", alg, &read(f)).unwrap_err().message;
        assert!(err(Algorithm::RS256, "rsa1024_public.pem").contains("2048"));
        assert!(err(Algorithm::RS256, "rsa_private.pem").contains("private"));
        assert!(err(Algorithm::RS256, "ec_public.pem").contains("RS256"));
        assert!(err(Algorithm::ES256, "rsa_public.pem").contains("ES256"));
        assert!(err(Algorithm::HS256, "rsa_public.pem").contains("secret"));
        assert!(
            pem_key("k", Algorithm::RS256, b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
                .is_err()
        );
    }

    #[test]
    fn jwks_skips_what_it_cannot_use() {
        let doc = serde_json::json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"},
            {"kty": "RSA", "kid": "short", "n": "AQAB", "e": "AQAB"},
        ]});
        let keys = parse_jwks("t", doc.to_string().as_bytes(), &SUPPORTED).unwrap();
        assert!(keys.is_empty());
        assert!(parse_jwks("t", b"{}", &SUPPORTED).is_err());
        assert!(parse_jwks("t", b"nope", &SUPPORTED).is_err());
    }
}
