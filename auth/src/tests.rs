//! Unit tests: every attack on token verification, and the claims' meaning.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

fn key_file(name: &str) -> String {
    format!("{}/../tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn read_key(name: &str) -> Vec<u8> {
    std::fs::read(key_file(name)).unwrap()
}

fn rsa_priv() -> EncodingKey {
    EncodingKey::from_rsa_pem(&read_key("rsa_private.pem")).unwrap()
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn hs(claims: &Value) -> String {
    sign(Algorithm::HS256, None, &EncodingKey::from_secret(SECRET.as_bytes()), claims)
}

fn rs(claims: &Value) -> String {
    sign(Algorithm::RS256, None, &rsa_priv(), claims)
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

fn exp_in(secs: i64) -> u64 {
    (now_secs() as i64 + secs) as u64
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": exp_in(3600), "iat": now_secs()})
}

fn hs_cfg() -> AuthConfig {
    AuthConfig { hmac_secret: Some(SECRET.into()), ..AuthConfig::default() }
}

fn rs_key_cfg(kid: Option<&str>) -> KeyConfig {
    KeyConfig {
        algorithm: "RS256".into(),
        kid: kid.map(str::to_string),
        secret: None,
        secret_base64: None,
        pem: None,
        file: Some(key_file("rsa_public.pem").into()),
    }
}

/// HS256 and RS256 both configured: the hardest case for algorithm confusion.
fn mixed() -> Verifier {
    let cfg = AuthConfig { keys: vec![rs_key_cfg(None)], ..hs_cfg() };
    Verifier::new(&cfg).unwrap().unwrap()
}

fn verifier(cfg: &AuthConfig) -> Verifier {
    Verifier::new(cfg).unwrap().unwrap()
}

async fn conn_err(v: &Verifier, token: &str) -> TokenError {
    v.verify_connection(token).await.map(|t| t.user).unwrap_err()
}

#[tokio::test]
async fn valid_tokens_of_every_algorithm() {
    let ec = EncodingKey::from_ec_pem(&read_key("ec_private.pem")).unwrap();
    let ed = EncodingKey::from_ed_pem(&read_key("ed25519_private.pem")).unwrap();
    let pem_cfg = |alg: &str, file: &str| KeyConfig {
        algorithm: alg.into(),
        kid: None,
        secret: None,
        secret_base64: None,
        pem: Some(String::from_utf8(read_key(file)).unwrap()),
        file: None,
    };
    let secret_cfg = |alg: &str, secret: &str| KeyConfig {
        algorithm: alg.into(),
        kid: None,
        secret: Some(secret.into()),
        secret_base64: None,
        pem: None,
        file: None,
    };
    let s384 = "x".repeat(48);
    let s512 = "y".repeat(64);
    let cfg = AuthConfig {
        keys: vec![
            rs_key_cfg(None),
            pem_cfg("ES256", "ec_public.pem"),
            pem_cfg("EdDSA", "ed25519_public.pem"),
            secret_cfg("HS384", &s384),
            secret_cfg("HS512", &s512),
        ],
        ..hs_cfg()
    };
    let v = verifier(&cfg);
    let c = json!({"sub": "alice", "exp": exp_in(60), "info": {"name": "Alice"}, "rooms": ["tok:a", "tok:team-*"]});
    for token in [
        hs(&c),
        rs(&c),
        sign(Algorithm::ES256, None, &ec, &c),
        sign(Algorithm::EdDSA, None, &ed, &c),
        sign(Algorithm::HS384, None, &EncodingKey::from_secret(s384.as_bytes()), &c),
        sign(Algorithm::HS512, None, &EncodingKey::from_secret(s512.as_bytes()), &c),
    ] {
        let t = v.verify_connection(&token).await.unwrap();
        assert_eq!(t.user, "alice");
        assert_eq!(t.info.unwrap().json().unwrap().as_ref(), br#"{"name":"Alice"}"#);
        assert!(t.rooms.allows("tok:a") && t.rooms.allows("tok:team-x") && t.rooms.allows("tok:team-"));
        assert!(!t.rooms.allows("tok:ab") && !t.rooms.allows("tok:b") && !t.rooms.allows("tok:tea"));
        assert!((55..=60).contains(&time_until(t.expires_at).as_secs()));
    }
    // Anonymous token (sub ""), fractional exp, info null.
    let t = v
        .verify_connection(&hs(&json!({"sub": "", "exp": exp_in(60) as f64 + 0.5, "info": null})))
        .await
        .unwrap();
    assert_eq!((t.user.as_str(), t.info.is_none(), t.rooms.is_empty()), ("", true, true));
}

#[tokio::test]
async fn alg_none_is_refused() {
    let v = mixed();
    let body = b64(&claims("alice"));
    for alg in ["none", "None", "NONE", "nOnE"] {
        let token = format!("{}.{body}.", b64(&json!({"alg": alg, "typ": "JWT"})));
        assert_eq!(conn_err(&v, &token).await, TokenError::AlgorithmNotAllowed(alg.into()));
        // With a signature part that is not empty, too.
        let token = format!("{}.{body}.c2ln", b64(&json!({"alg": alg})));
        assert!(matches!(conn_err(&v, &token).await, TokenError::AlgorithmNotAllowed(_)));
    }
    // No alg at all, or not a string.
    let token = format!("{}.{body}.", b64(&json!({"typ": "JWT"})));
    assert!(matches!(conn_err(&v, &token).await, TokenError::Malformed(_)));
    let token = format!("{}.{body}.", b64(&json!({"alg": null})));
    assert!(matches!(conn_err(&v, &token).await, TokenError::Malformed(_)));
}

#[tokio::test]
async fn unconfigured_algorithms_are_refused() {
    // Only HS256 configured: a valid HS512 or RS256 signature is still refused.
    let v = verifier(&hs_cfg());
    let c = claims("alice");
    let hs512 = sign(Algorithm::HS512, None, &EncodingKey::from_secret(&[b'z'; 64]), &c);
    assert_eq!(conn_err(&v, &hs512).await, TokenError::AlgorithmNotAllowed("HS512".into()));
    assert_eq!(conn_err(&v, &rs(&c)).await, TokenError::AlgorithmNotAllowed("RS256".into()));
    // Algorithms roomcast never accepts, even with a key that fits.
    let rs384 = sign(Algorithm::RS384, None, &rsa_priv(), &c);
    assert_eq!(conn_err(&mixed(), &rs384).await, TokenError::AlgorithmNotAllowed("RS384".into()));
    let ps256 = sign(Algorithm::PS256, None, &rsa_priv(), &c);
    assert_eq!(conn_err(&mixed(), &ps256).await, TokenError::AlgorithmNotAllowed("PS256".into()));
    // Case matters: "hs256" is not HS256.
    let good = hs(&c);
    let (_, rest) = good.split_once('.').unwrap();
    let lower = format!("{}.{rest}", b64(&json!({"alg": "hs256", "typ": "JWT"})));
    assert!(matches!(conn_err(&v, &lower).await, TokenError::AlgorithmNotAllowed(_)));
    // An explicit list narrows what the keys would allow.
    let cfg = AuthConfig {
        algorithms: vec!["RS256".into()],
        keys: vec![rs_key_cfg(None)],
        ..AuthConfig::default()
    };
    let v = verifier(&cfg);
    assert!(v.verify_connection(&rs(&c)).await.is_ok());
    assert!(matches!(conn_err(&v, &hs(&c)).await, TokenError::AlgorithmNotAllowed(_)));
}

#[tokio::test]
async fn hs_rs_confusion_is_refused() {
    // The attacker signs HS256 with the server's RSA *public* key as the HMAC secret.
    let pem = read_key("rsa_public.pem");
    let forged = sign(Algorithm::HS256, None, &EncodingKey::from_secret(&pem), &claims("admin"));
    // Only RS256 configured: HS256 is not allowed at all.
    let cfg = AuthConfig { keys: vec![rs_key_cfg(None)], ..AuthConfig::default() };
    assert_eq!(conn_err(&verifier(&cfg), &forged).await, TokenError::AlgorithmNotAllowed("HS256".into()));
    // HS256 and RS256 configured: the HS256 token is checked against the HMAC secret only.
    assert_eq!(conn_err(&mixed(), &forged).await, TokenError::BadSignature);
    // Variants of the key text (DER, no newline) do not help either.
    let der = URL_SAFE_NO_PAD.encode(&pem);
    let forged2 = sign(Algorithm::HS256, None, &EncodingKey::from_secret(der.as_bytes()), &claims("admin"));
    assert_eq!(conn_err(&mixed(), &forged2).await, TokenError::BadSignature);
    // And a public key can never be configured as an HMAC secret.
    let cfg = AuthConfig { hmac_secret: Some(String::from_utf8(pem).unwrap()), ..AuthConfig::default() };
    assert!(Verifier::new(&cfg).unwrap_err().message.contains("PEM"));
}

#[tokio::test]
async fn wrong_key_and_tampering_are_refused() {
    let v = mixed();
    let c = claims("alice");
    let other_rsa = EncodingKey::from_rsa_pem(&read_key("rsa2_private.pem")).unwrap();
    assert_eq!(conn_err(&v, &sign(Algorithm::RS256, None, &other_rsa, &c)).await, TokenError::BadSignature);
    let other_secret = EncodingKey::from_secret(b"another-secret-another-secret-another-secret");
    assert_eq!(
        conn_err(&v, &sign(Algorithm::HS256, None, &other_secret, &c)).await,
        TokenError::BadSignature
    );
    // Tampered payload: same header and signature, sub changed to admin.
    for good in [hs(&c), rs(&c)] {
        let parts: Vec<&str> = good.split('.').collect();
        let tampered = format!("{}.{}.{}", parts[0], b64(&claims("admin")), parts[2]);
        assert_eq!(conn_err(&v, &tampered).await, TokenError::BadSignature);
        // Tampered header (an added kid) also breaks the signature.
        let h2 = b64(&json!({"alg": if good == hs(&c) { "HS256" } else { "RS256" }, "typ": "JWT", "x": 1}));
        let tampered = format!("{h2}.{}.{}", parts[1], parts[2]);
        assert_eq!(conn_err(&v, &tampered).await, TokenError::BadSignature);
        // Signature cut or stripped.
        let cut = format!("{}.{}.{}", parts[0], parts[1], &parts[2][..parts[2].len() / 2]);
        assert!(matches!(conn_err(&v, &cut).await, TokenError::BadSignature | TokenError::Malformed(_)));
        let stripped = format!("{}.{}.", parts[0], parts[1]);
        assert!(matches!(conn_err(&v, &stripped).await, TokenError::BadSignature | TokenError::Malformed(_)));
    }
    // Garbage.
    for junk in ["", "a", "a.b", "a.b.c.d", "!!!.e30.x", "e30.e30.x", &"a".repeat(MAX_TOKEN_LEN + 1)] {
        assert!(
            matches!(conn_err(&v, junk).await, TokenError::Malformed(_) | TokenError::AlgorithmNotAllowed(_)),
            "{junk:.20}"
        );
    }
    // crit extensions are refused.
    let parts: Vec<String> = hs(&c).split('.').map(str::to_string).collect();
    let crit = format!("{}.{}.{}", b64(&json!({"alg": "HS256", "crit": ["exp"]})), parts[1], parts[2]);
    assert!(matches!(conn_err(&v, &crit).await, TokenError::Malformed(_)));
}

#[tokio::test]
async fn time_claims() {
    let v = mixed();
    let expired = json!({"sub": "a", "exp": exp_in(-5)});
    assert_eq!(conn_err(&v, &hs(&expired)).await, TokenError::Expired);
    assert!(conn_err(&v, &rs(&expired)).await.is_expired());
    let future = json!({"sub": "a", "exp": exp_in(600), "nbf": exp_in(300)});
    assert_eq!(conn_err(&v, &hs(&future)).await, TokenError::NotYetValid);
    assert!(!TokenError::NotYetValid.is_expired());
    let started = json!({"sub": "a", "exp": exp_in(600), "nbf": exp_in(-10), "iat": exp_in(-10)});
    assert!(v.verify_connection(&hs(&started)).await.is_ok());
    // exp is required, and must be a number.
    assert!(matches!(conn_err(&v, &hs(&json!({"sub": "a"}))).await, TokenError::Claims(_)));
    assert!(matches!(conn_err(&v, &hs(&json!({"sub": "a", "exp": "soon"}))).await, TokenError::Claims(_)));
    // Leeway, when configured, applies to both.
    let cfg = AuthConfig { leeway_secs: 30, ..hs_cfg() };
    let v = verifier(&cfg);
    assert!(v.verify_connection(&hs(&expired)).await.is_ok());
    assert!(
        v.verify_connection(&hs(&json!({"sub": "a", "exp": exp_in(600), "nbf": exp_in(20)}))).await.is_ok()
    );
}

#[tokio::test]
async fn audience_and_issuer() {
    let cfg = AuthConfig {
        audience: Some(OneOrMany::Many(vec!["roomcast".into(), "chat".into()])),
        issuer: Some(OneOrMany::One("https://auth.example".into())),
        ..hs_cfg()
    };
    let v = verifier(&cfg);
    let with = |aud: Value, iss: Value| {
        let mut c = claims("a");
        if !aud.is_null() {
            c["aud"] = aud;
        }
        if !iss.is_null() {
            c["iss"] = iss;
        }
        hs(&c)
    };
    let iss = json!("https://auth.example");
    assert!(v.verify_connection(&with(json!("roomcast"), iss.clone())).await.is_ok());
    assert!(v.verify_connection(&with(json!(["other", "chat"]), iss.clone())).await.is_ok());
    assert_eq!(conn_err(&v, &with(json!("other"), iss.clone())).await, TokenError::WrongAudience);
    assert!(matches!(conn_err(&v, &with(Value::Null, iss.clone())).await, TokenError::Claims(_)));
    assert_eq!(
        conn_err(&v, &with(json!("roomcast"), json!("https://evil.example"))).await,
        TokenError::WrongIssuer
    );
    assert!(matches!(conn_err(&v, &with(json!("roomcast"), Value::Null)).await, TokenError::Claims(_)));
    // Not configured: not checked.
    let v = verifier(&hs_cfg());
    assert!(v.verify_connection(&with(json!("anything"), json!("anyone"))).await.is_ok());
}

#[tokio::test]
async fn claims_shape() {
    let v = verifier(&hs_cfg());
    // sub is required (it may be empty) and must be a string.
    assert!(matches!(conn_err(&v, &hs(&json!({"exp": exp_in(60)}))).await, TokenError::Claims(_)));
    assert!(matches!(conn_err(&v, &hs(&json!({"sub": 5, "exp": exp_in(60)}))).await, TokenError::Claims(_)));
    // rooms must be a list of non-empty strings.
    for rooms in [json!("tok:a"), json!([1]), json!([""])] {
        let c = json!({"sub": "a", "exp": exp_in(60), "rooms": rooms});
        assert!(matches!(conn_err(&v, &hs(&c)).await, TokenError::Claims(_)), "{rooms}");
    }
    // info: any JSON, kept as data.
    let c = json!({"sub": "a", "exp": exp_in(60), "info": [1, "two", {"3": null}]});
    let t = v.verify_connection(&hs(&c)).await.unwrap();
    assert_eq!(t.info.unwrap().json().unwrap().as_ref(), br#"[1,"two",{"3":null}]"#);
    // A subscription token (room claim) cannot connect.
    let sub_token = hs(&json!({"sub": "a", "room": "tok:x", "exp": exp_in(60)}));
    assert_eq!(conn_err(&v, &sub_token).await, TokenError::NotAConnectionToken);
}

#[tokio::test]
async fn subscription_tokens() {
    let v = mixed();
    let t = hs(&json!({"sub": "alice", "room": "tok:r1", "exp": exp_in(60), "info": {"role": "mod"}}));
    let s = v.verify_subscription(&t, "alice", "tok:r1").await.unwrap();
    assert_eq!(s.room_info.unwrap().json().unwrap().as_ref(), br#"{"role":"mod"}"#);
    // For another room, or another user.
    assert_eq!(v.verify_subscription(&t, "alice", "tok:r2").await.unwrap_err(), TokenError::WrongRoom);
    assert_eq!(v.verify_subscription(&t, "mallory", "tok:r1").await.unwrap_err(), TokenError::WrongSubject);
    assert_eq!(v.verify_subscription(&t, "", "tok:r1").await.unwrap_err(), TokenError::WrongSubject);
    // Expired.
    let old = rs(&json!({"sub": "alice", "room": "tok:r1", "exp": exp_in(-1)}));
    assert_eq!(v.verify_subscription(&old, "alice", "tok:r1").await.unwrap_err(), TokenError::Expired);
    // A connection token is not a subscription token (no room claim).
    let conn = hs(&claims("alice"));
    assert!(matches!(
        v.verify_subscription(&conn, "alice", "tok:r1").await.unwrap_err(),
        TokenError::Claims(_)
    ));
    // Same algorithm rules as connection tokens.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none"})),
        b64(&json!({"sub": "alice", "room": "tok:r1", "exp": exp_in(60)}))
    );
    assert!(matches!(
        v.verify_subscription(&none, "alice", "tok:r1").await.unwrap_err(),
        TokenError::AlgorithmNotAllowed(_)
    ));
}

#[tokio::test]
async fn kid_selection_with_static_keys() {
    let cfg = AuthConfig { keys: vec![rs_key_cfg(Some("k1"))], ..AuthConfig::default() };
    let v = verifier(&cfg);
    let c = claims("alice");
    assert!(v.verify_connection(&sign(Algorithm::RS256, Some("k1"), &rsa_priv(), &c)).await.is_ok());
    assert!(v.verify_connection(&sign(Algorithm::RS256, None, &rsa_priv(), &c)).await.is_ok());
    assert_eq!(
        conn_err(&v, &sign(Algorithm::RS256, Some("k2"), &rsa_priv(), &c)).await,
        TokenError::UnknownKey("k2".into())
    );
}

#[test]
fn configuration_errors() {
    let err = |cfg: AuthConfig| Verifier::new(&cfg).unwrap_err().to_string();
    assert!(Verifier::new(&AuthConfig::default()).unwrap().is_none());
    assert!(err(AuthConfig { algorithms: vec!["HS256".into()], ..AuthConfig::default() }).contains("no key"));
    assert!(
        err(AuthConfig { algorithms: vec!["none".into()], ..hs_cfg() }).contains("unsupported algorithm")
    );
    assert!(err(AuthConfig { algorithms: vec!["RS384".into()], ..hs_cfg() }).contains("RS384"));
    assert!(err(AuthConfig { algorithms: vec!["RS256".into()], ..hs_cfg() }).contains("not in the list"));
    assert!(
        err(AuthConfig { hmac_secret: Some("short".into()), ..AuthConfig::default() }).contains("32 bytes")
    );
    let mut k = rs_key_cfg(None);
    k.algorithm = "RS512".into();
    assert!(err(AuthConfig { keys: vec![k], ..AuthConfig::default() }).contains("auth.keys[0].algorithm"));
    let mut k = rs_key_cfg(None);
    k.file = Some(key_file("nope.pem").into());
    assert!(err(AuthConfig { keys: vec![k], ..AuthConfig::default() }).contains("cannot read"));
    let mut k = rs_key_cfg(None);
    k.file = None;
    k.pem = Some("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n".into());
    assert!(err(AuthConfig { keys: vec![k], ..AuthConfig::default() }).contains("auth.keys[0].pem"));
    let mut k = rs_key_cfg(None);
    k.secret = Some(SECRET.into());
    assert!(err(AuthConfig { keys: vec![k], ..AuthConfig::default() }).contains("exactly one"));
    let mut k = rs_key_cfg(None);
    k.file = Some(key_file("rsa1024_public.pem").into());
    assert!(err(AuthConfig { keys: vec![k], ..AuthConfig::default() }).contains("2048"));
    assert!(
        err(AuthConfig { jwks_url: Some("http://keys.example/jwks".into()), ..AuthConfig::default() })
            .contains("https")
    );
    assert!(err(AuthConfig { jwks_url: Some("ftp://x/".into()), ..AuthConfig::default() }).contains("https"));
    assert!(
        err(AuthConfig { jwks_file: Some(key_file("missing.json").into()), ..AuthConfig::default() })
            .contains("jwks_file")
    );
    assert!(err(AuthConfig { audience: Some(OneOrMany::Many(vec![])), ..hs_cfg() }).contains("audience"));
    // Loopback http and https are fine.
    assert!(
        Verifier::new(&AuthConfig {
            jwks_url: Some("http://127.0.0.1:1/jwks".into()),
            ..AuthConfig::default()
        })
        .is_ok()
    );
    assert!(
        Verifier::new(&AuthConfig {
            jwks_url: Some("https://keys.example/jwks".into()),
            ..AuthConfig::default()
        })
        .is_ok()
    );
}

fn jwks_doc(keys: &[(&str, Algorithm, &str)]) -> String {
    let set = JwkSet {
        keys: keys
            .iter()
            .map(|(kid, alg, file)| {
                let key = match alg {
                    Algorithm::RS256 => EncodingKey::from_rsa_pem(&read_key(file)).unwrap(),
                    Algorithm::ES256 => EncodingKey::from_ec_pem(&read_key(file)).unwrap(),
                    _ => EncodingKey::from_ed_pem(&read_key(file)).unwrap(),
                };
                let mut jwk = Jwk::from_encoding_key(&key, *alg).unwrap();
                jwk.common.key_id = Some(kid.to_string());
                jwk
            })
            .collect(),
    };
    serde_json::to_string(&set).unwrap()
}

#[tokio::test]
async fn jwks_file_keys_and_unknown_kid() {
    let dir = std::env::temp_dir().join(format!("roomcast-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jwks.json");
    std::fs::write(
        &path,
        jwks_doc(&[("r1", Algorithm::RS256, "rsa_private.pem"), ("e1", Algorithm::ES256, "ec_private.pem")]),
    )
    .unwrap();
    let cfg = AuthConfig { jwks_file: Some(path.clone()), jwks_min_refresh_ms: 0, ..AuthConfig::default() };
    let v = verifier(&cfg);
    let c = claims("alice");
    let ec = EncodingKey::from_ec_pem(&read_key("ec_private.pem")).unwrap();
    let ed = EncodingKey::from_ed_pem(&read_key("ed25519_private.pem")).unwrap();
    assert!(v.verify_connection(&sign(Algorithm::RS256, Some("r1"), &rsa_priv(), &c)).await.is_ok());
    assert!(v.verify_connection(&sign(Algorithm::ES256, Some("e1"), &ec, &c)).await.is_ok());
    // No kid: every key of the algorithm is tried.
    assert!(v.verify_connection(&sign(Algorithm::RS256, None, &rsa_priv(), &c)).await.is_ok());
    // A kid of another algorithm's key does not let a token pick it.
    assert_eq!(
        conn_err(&v, &sign(Algorithm::RS256, Some("e1"), &rsa_priv(), &c)).await,
        TokenError::UnknownKey("e1".into())
    );
    // HMAC is never accepted from a JWKS configuration (no HS algorithm is allowed).
    assert!(matches!(conn_err(&v, &hs(&c)).await, TokenError::AlgorithmNotAllowed(_)));
    // Unknown kid: refused, then found after the key set is rotated (one refresh).
    let ed_token = sign(Algorithm::EdDSA, Some("d1"), &ed, &c);
    assert_eq!(conn_err(&v, &ed_token).await, TokenError::UnknownKey("d1".into()));
    std::fs::write(&path, jwks_doc(&[("d1", Algorithm::EdDSA, "ed25519_private.pem")])).unwrap();
    assert!(v.verify_connection(&ed_token).await.is_ok());
    // The old keys are gone after the rotation.
    assert!(matches!(
        conn_err(&v, &sign(Algorithm::RS256, Some("r1"), &rsa_priv(), &c)).await,
        TokenError::UnknownKey(_)
    ));
    // A broken file keeps the last good keys.
    std::fs::write(&path, "not json").unwrap();
    assert!(matches!(
        conn_err(&v, &sign(Algorithm::EdDSA, Some("zz"), &ed, &c)).await,
        TokenError::UnknownKey(_)
    ));
    assert!(v.verify_connection(&ed_token).await.is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A one-route HTTP server serving `body()` and counting requests.
async fn jwks_server(body: Arc<parking_lot::Mutex<String>>, hits: Arc<AtomicUsize>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let body = body.clone();
            let hits = hits.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n) = s.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                hits.fetch_add(1, Ordering::SeqCst);
                let b = body.lock().clone();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
                    b.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    format!("http://{addr}/.well-known/jwks.json")
}

#[tokio::test]
async fn jwks_url_fetch_refresh_and_rate_limit() {
    let body = Arc::new(parking_lot::Mutex::new(jwks_doc(&[("r1", Algorithm::RS256, "rsa_private.pem")])));
    let hits = Arc::new(AtomicUsize::new(0));
    let url = jwks_server(body.clone(), hits.clone()).await;
    let cfg = AuthConfig { jwks_url: Some(url), jwks_min_refresh_ms: 60_000, ..AuthConfig::default() };
    let v = verifier(&cfg);
    let c = claims("alice");
    // Before any fetch, an unknown kid triggers the first one.
    assert!(v.verify_connection(&sign(Algorithm::RS256, Some("r1"), &rsa_priv(), &c)).await.is_ok());
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // Random kids: at most one refresh per jwks_min_refresh_ms.
    for i in 0..20 {
        let t = sign(Algorithm::RS256, Some(&format!("random-{i}")), &rsa_priv(), &c);
        assert!(matches!(conn_err(&v, &t).await, TokenError::UnknownKey(_)));
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1, "unknown kids within the interval fetch nothing");
    // The periodic refresh picks up a rotation.
    *body.lock() = jwks_doc(&[("r2", Algorithm::RS256, "rsa2_private.pem")]);
    v.jwks().unwrap().refresh().await.unwrap();
    let other = EncodingKey::from_rsa_pem(&read_key("rsa2_private.pem")).unwrap();
    assert!(v.verify_connection(&sign(Algorithm::RS256, Some("r2"), &other, &c)).await.is_ok());
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn jwks_url_unknown_kid_refreshes_once_when_allowed() {
    let body = Arc::new(parking_lot::Mutex::new(jwks_doc(&[("r1", Algorithm::RS256, "rsa_private.pem")])));
    let hits = Arc::new(AtomicUsize::new(0));
    let url = jwks_server(body.clone(), hits.clone()).await;
    let cfg = AuthConfig { jwks_url: Some(url), jwks_min_refresh_ms: 0, ..AuthConfig::default() };
    let v = verifier(&cfg);
    let _bg = v.start_background();
    let c = claims("alice");
    assert!(v.verify_connection(&sign(Algorithm::RS256, Some("r1"), &rsa_priv(), &c)).await.is_ok());
    // Rotated at the server: the unknown kid makes the node fetch again and accept.
    *body.lock() = jwks_doc(&[("r2", Algorithm::RS256, "rsa2_private.pem")]);
    let other = EncodingKey::from_rsa_pem(&read_key("rsa2_private.pem")).unwrap();
    assert!(v.verify_connection(&sign(Algorithm::RS256, Some("r2"), &other, &c)).await.is_ok());
}

#[test]
fn room_grants() {
    let g = RoomGrants::new(vec!["a".into(), "ns:p*".into()]);
    assert!(g.allows("a") && g.allows("ns:p") && g.allows("ns:pq"));
    assert!(!g.allows("ab") && !g.allows("ns:") && !g.allows("x"));
    assert!(RoomGrants::new(vec!["*".into()]).allows("anything"));
    assert!(!RoomGrants::default().allows("a"));
}
