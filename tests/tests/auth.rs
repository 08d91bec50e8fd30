//! Tokens against a real node (spec sections 2.1, 3 and 6): connection tokens of every
//! configured algorithm, each known attack refused with the right code while the node
//! keeps serving others, refresh and expiry, `token` and `user` namespaces, the `rooms`
//! claim, subscription tokens and their `room_info`, and keys from a JWKS file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use roomcast_tests::{
    Enc, NodeOptions, NodeProc, TestClient, Value, assert_error, json, str_of, u64_of, unique, within,
};

const SECRET: &str = "roomcast-tests-hmac-secret-of-at-least-32-bytes";
const AUD: &str = "roomcast-tests";
const ISS: &str = "https://issuer.test";

fn keys_dir() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/keys").to_string()
}

fn key(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/{name}", keys_dir())).unwrap()
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Connection claims for `sub`, valid for `ttl` seconds, with the configured aud/iss.
fn claims(sub: &str, ttl: i64) -> Value {
    json!({"sub": sub, "exp": now() + ttl, "iat": now(), "aud": AUD, "iss": ISS})
}

fn with(mut c: Value, key: &str, v: Value) -> Value {
    c[key] = v;
    c
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn hs(c: &Value) -> String {
    sign(Algorithm::HS256, None, &EncodingKey::from_secret(SECRET.as_bytes()), c)
}

fn rs(c: &Value) -> String {
    sign(Algorithm::RS256, None, &EncodingKey::from_rsa_pem(&key("rsa_private.pem")).unwrap(), c)
}

fn es(kid: &str, c: &Value) -> String {
    sign(Algorithm::ES256, Some(kid), &EncodingKey::from_ec_pem(&key("ec_private.pem")).unwrap(), c)
}

fn b64(v: &Value) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// HS256 (env), RS256 (file), ES256 (file, kid "ec-1"); audience and issuer checked;
/// anonymous off (the default once a key is configured).
fn auth_config() -> String {
    format!(
        r#"
[auth]
algorithms = ["HS256", "RS256", "ES256"]
audience = "{AUD}"
issuer = "{ISS}"

[[auth.keys]]
algorithm = "RS256"
file = "{dir}/rsa_public.pem"

[[auth.keys]]
algorithm = "ES256"
kid = "ec-1"
file = "{dir}/ec_public.pem"

[namespaces.tok]
subscribe = "token"

[namespaces.user]
subscribe = "user"

[namespaces.auth]
subscribe = "authenticated"
publish = "authenticated"
"#,
        dir = keys_dir()
    )
}

fn start_auth_node(extra_env: &[(&str, &str)]) -> NodeProc {
    NodeProc::start(
        NodeOptions::with_config(&auth_config()).env("ROOMCAST_JWT_HMAC_SECRET", SECRET).envs(extra_env),
    )
}

/// Opens a connection and sends `connect` with `token`; returns the client and the reply.
async fn connect_with(url: &str, enc: Enc, token: Option<&str>) -> (TestClient, Value) {
    let mut c = TestClient::open(url, enc).await;
    let mut cmd = json!({"type": "connect", "name": "roomcast-tests"});
    if let Some(t) = token {
        cmd["token"] = json!(t);
    }
    let r = c.request(cmd).await;
    if r["type"] == "connected" {
        c.client_id = str_of(&r, "client").to_string();
        c.connected = r.clone();
    }
    (c, r)
}

/// A client connected with `token`.
async fn connected_as(url: &str, enc: Enc, token: &str) -> TestClient {
    let (c, r) = connect_with(url, enc, Some(token)).await;
    assert_eq!(r["type"], "connected", "{r}");
    c
}

/// The node still serves a properly authenticated client end to end.
async fn assert_serves(url: &str) {
    let mut c = connected_as(url, Enc::Json, &hs(&claims("still-here", 600))).await;
    let room = format!("alive-{}", unique());
    let r = c.request(json!({"type": "subscribe", "room": room})).await;
    assert_eq!(r["type"], "subscribed", "{r}");
    c.request(json!({"type": "publish", "room": room, "data": {"ok": true}})).await;
    assert_eq!(c.recv_type("publication").await["data"], json!({"ok": true}));
    c.close().await;
}

/// The connection is open and answers.
async fn assert_alive(c: &mut TestClient) {
    let r = c.request(json!({"type": "presence_stats", "room": "alive"})).await;
    assert_eq!(r["type"], "presence_stats", "{r}");
}

#[tokio::test]
async fn valid_tokens_connect_with_user_info_and_expiry() {
    let node = start_auth_node(&[]);
    let url = node.ws_url();
    let info = json!({"name": "Alice", "roles": ["admin"], "n": 1});
    for enc in Enc::BOTH {
        let c = with(claims("alice", 3600), "info", info.clone());
        for token in [hs(&c), rs(&c), es("ec-1", &c)] {
            let (mut a, r) = connect_with(&url, enc, Some(&token)).await;
            assert_eq!(r["type"], "connected", "{r}");
            let expires_in = u64_of(&r, "expires_in");
            assert!((3590..=3600).contains(&expires_in), "expires_in {expires_in}: {r}");
            // The user and the info claim show in presence.
            let room = format!("p-{}", unique());
            let s = a.request(json!({"type": "subscribe", "room": room, "presence": true})).await;
            assert_eq!(s["type"], "subscribed", "{s}");
            let members = s["members"].as_array().unwrap();
            assert_eq!(members.len(), 1, "{s}");
            assert_eq!(members[0]["user"], "alice");
            assert_eq!(members[0]["client"], a.client_id.as_str());
            assert_eq!(members[0]["info"], info, "{s}");
            assert!(members[0].get("room_info").is_none(), "{s}");
            // Another user joining is seen with its own info.
            let mut b = connected_as(&url, enc, &rs(&with(claims("bob", 600), "info", json!("Bob")))).await;
            b.request(json!({"type": "subscribe", "room": room})).await;
            let j = a.recv_type("join").await;
            assert_eq!(
                (j["member"]["user"].clone(), j["member"]["info"].clone()),
                (json!("bob"), json!("Bob")),
                "{j}"
            );
            // Publications carry the user.
            a.request(json!({"type": "publish", "room": room, "data": 1})).await;
            let p = b.recv_type("publication").await;
            assert_eq!(p["info"]["user"], "alice", "{p}");
            a.close().await;
            b.close().await;
        }
    }
}

#[tokio::test]
async fn anonymous_is_off_with_keys_unless_enabled() {
    let node = start_auth_node(&[]);
    for enc in Enc::BOTH {
        let (mut c, r) = connect_with(&node.ws_url(), enc, None).await;
        assert_error(&r, 101);
        assert_eq!(c.expect_close().await.0, 4001);
        // An empty token is no token.
        let (mut c, r) = connect_with(&node.ws_url(), enc, Some("")).await;
        assert_error(&r, 101);
        assert_eq!(c.expect_close().await.0, 4001);
    }
    let node = start_auth_node(&[("ROOMCAST_ALLOW_ANONYMOUS", "true")]);
    let (mut c, r) = connect_with(&node.ws_url(), Enc::Json, None).await;
    assert_eq!(r["type"], "connected", "{r}");
    assert!(r.get("expires_in").is_none(), "{r}");
    // Anonymous: `authenticated` namespaces stay closed.
    assert_error(&c.request(json!({"type": "subscribe", "room": "auth:x"})).await, 103);
    assert_error(&c.request(json!({"type": "publish", "room": "auth:x", "data": 1})).await, 103);
    // A token with sub "" is anonymous too.
    let (mut c2, r) = connect_with(&node.ws_url(), Enc::Json, Some(&hs(&claims("", 600)))).await;
    assert_eq!(r["type"], "connected", "{r}");
    assert_error(&c2.request(json!({"type": "subscribe", "room": "auth:x"})).await, 103);
}

#[tokio::test]
async fn attacks_are_refused_and_the_node_serves_on() {
    let node = start_auth_node(&[]);
    let url = node.ws_url();
    let good = claims("mallory", 600);
    let rsa_public = key("rsa_public.pem");
    let body = b64(&good);
    let tampered = {
        let t = rs(&claims("bob", 600));
        let parts: Vec<&str> = t.split('.').collect();
        format!("{}.{}.{}", parts[0], b64(&claims("admin", 600)), parts[2])
    };
    let ed = EncodingKey::from_ed_pem(&key("ed25519_private.pem")).unwrap();
    let cases: Vec<(&str, String, u64, u16)> = vec![
        ("alg none", format!("{}.{body}.", b64(&json!({"alg": "none", "typ": "JWT"}))), 101, 4001),
        ("alg None with a signature", format!("{}.{body}.c2ln", b64(&json!({"alg": "None"}))), 101, 4001),
        (
            "HS/RS confusion: HS256 with the RSA public key as the secret",
            sign(Algorithm::HS256, None, &EncodingKey::from_secret(&rsa_public), &good),
            101,
            4001,
        ),
        (
            "wrong RSA key",
            sign(
                Algorithm::RS256,
                None,
                &EncodingKey::from_rsa_pem(&key("rsa2_private.pem")).unwrap(),
                &good,
            ),
            101,
            4001,
        ),
        (
            "wrong HMAC secret",
            sign(Algorithm::HS256, None, &EncodingKey::from_secret(&[b'x'; 48]), &good),
            101,
            4001,
        ),
        ("unconfigured algorithm EdDSA", sign(Algorithm::EdDSA, None, &ed, &good), 101, 4001),
        (
            "unconfigured algorithm HS512",
            sign(Algorithm::HS512, None, &EncodingKey::from_secret(&[b'x'; 64]), &good),
            101,
            4001,
        ),
        ("tampered payload", tampered, 101, 4001),
        ("unknown kid", es("ec-2", &good), 101, 4001),
        ("expired", hs(&claims("mallory", -30)), 109, 4004),
        ("expired (RS256)", rs(&claims("mallory", -30)), 109, 4004),
        ("nbf in the future", hs(&with(good.clone(), "nbf", json!(now() + 300))), 101, 4001),
        ("wrong audience", hs(&with(good.clone(), "aud", json!("someone-else"))), 101, 4001),
        ("no audience", hs(&json!({"sub": "m", "exp": now() + 600, "iss": ISS})), 101, 4001),
        ("wrong issuer", hs(&with(good.clone(), "iss", json!("https://evil.test"))), 101, 4001),
        ("no exp", hs(&json!({"sub": "m", "aud": AUD, "iss": ISS})), 101, 4001),
        ("no sub", hs(&json!({"exp": now() + 600, "aud": AUD, "iss": ISS})), 101, 4001),
        (
            "subscription token used to connect",
            hs(&with(good.clone(), "room", json!("tok:secret"))),
            101,
            4001,
        ),
        ("garbage", "not.a.token".to_string(), 101, 4001),
    ];
    for (what, token, code, close) in &cases {
        let enc = if unique().is_multiple_of(2) { Enc::Json } else { Enc::Msgpack };
        let (mut c, r) = connect_with(&url, enc, Some(token)).await;
        assert_eq!(r["code"], *code, "{what}: {r}");
        assert_error(&r, *code);
        let (got, _) = c.expect_close().await;
        assert_eq!(got, *close, "{what}");
        assert_eq!(c.disconnect()["reconnect"], *close == 4004, "{what}: {}", c.disconnect());
    }
    // A client connected before the attacks is still served, and so are new ones.
    assert_serves(&url).await;
}

#[tokio::test]
async fn refresh_extends_and_checks_the_user() {
    let node = start_auth_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        // Refreshed before exp: the connection outlives its first token.
        let mut c = connected_as(&url, enc, &hs(&claims("alice", 3))).await;
        assert!(u64_of(&c.connected, "expires_in") <= 3, "{}", c.connected);
        let r = c.request(json!({"type": "refresh", "token": rs(&claims("alice", 3600))})).await;
        assert_eq!(r["type"], "refreshed", "{r}");
        assert!((3590..=3600).contains(&u64_of(&r, "expires_in")), "{r}");
        // An expired refresh token: 109, and the connection keeps its expiry.
        assert_error(&c.request(json!({"type": "refresh", "token": hs(&claims("alice", -10))})).await, 109);
        // Past the first token's exp, still connected (a fixed wait: expiry is about time).
        tokio::time::sleep(Duration::from_millis(3600)).await;
        assert_alive(&mut c).await;

        // A refresh token for another user: 101 and close 4001.
        let mut c = connected_as(&url, enc, &hs(&claims("alice", 600))).await;
        assert_error(&c.request(json!({"type": "refresh", "token": hs(&claims("bob", 600))})).await, 101);
        assert_eq!(c.expect_close().await.0, 4001);

        // An invalid refresh token: 101 and close 4001.
        let mut c = connected_as(&url, enc, &hs(&claims("alice", 600))).await;
        let forged = sign(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(&key("rsa_public.pem")),
            &claims("alice", 600),
        );
        assert_error(&c.request(json!({"type": "refresh", "token": forged})).await, 101);
        assert_eq!(c.expect_close().await.0, 4001);
    }
    assert_serves(&url).await;
}

#[tokio::test]
async fn a_connection_not_refreshed_by_exp_is_closed_4004() {
    let node = start_auth_node(&[]);
    let url = node.ws_url();
    let mut clients = Vec::new();
    for enc in Enc::BOTH {
        let c = connected_as(&url, enc, &hs(&claims("alice", 2))).await;
        assert!(u64_of(&c.connected, "expires_in") <= 2);
        clients.push(c);
    }
    let mut long = connected_as(&url, Enc::Json, &hs(&claims("bob", 600))).await;
    for mut c in clients {
        let (code, _) = within(Duration::from_secs(6), "close 4004", c.expect_close()).await;
        assert_eq!(code, 4004);
        assert_eq!(c.disconnect()["reconnect"], true, "{}", c.disconnect());
    }
    assert_alive(&mut long).await;
}

#[tokio::test]
async fn user_namespace() {
    let node = start_auth_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let mut c = connected_as(&url, enc, &hs(&claims("alice", 600))).await;
        let r = c.request(json!({"type": "subscribe", "room": "user:alice"})).await;
        assert_eq!(r["type"], "subscribed", "{r}");
        c.request(json!({"type": "unsubscribe", "room": "user:alice"})).await;
        assert_error(&c.request(json!({"type": "subscribe", "room": "user:bob"})).await, 103);
        assert_error(&c.request(json!({"type": "subscribe", "room": "user:alicex"})).await, 103);
        assert_error(&c.request(json!({"type": "presence", "room": "user:bob"})).await, 103);
        assert_error(&c.request(json!({"type": "history", "room": "user:bob"})).await, 103);
        assert_alive(&mut c).await;
    }
}

#[tokio::test]
async fn token_namespace_with_the_rooms_claim() {
    let node = start_auth_node(&[]);
    let url = node.ws_url();
    let grants = json!(["tok:exact", "tok:team-*"]);
    for enc in Enc::BOTH {
        let mut c = connected_as(&url, enc, &hs(&with(claims("alice", 600), "rooms", grants.clone()))).await;
        for room in ["tok:exact", "tok:team-red", "tok:team-"] {
            let r = c.request(json!({"type": "subscribe", "room": room})).await;
            assert_eq!(r["type"], "subscribed", "{room}: {r}");
            c.request(json!({"type": "unsubscribe", "room": room})).await;
        }
        for room in ["tok:exactly", "tok:teams", "tok:team", "tok:other"] {
            assert_error(&c.request(json!({"type": "subscribe", "room": room})).await, 103);
        }
        // Reading a granted room needs no subscription; a room not granted: 103.
        assert_eq!(
            c.request(json!({"type": "presence_stats", "room": "tok:team-blue"})).await["type"],
            "presence_stats"
        );
        assert_error(&c.request(json!({"type": "presence_stats", "room": "tok:other"})).await, 103);
        // A refresh replaces the grants.
        let r = c.request(json!({"type": "refresh", "token": hs(&with(claims("alice", 600), "rooms", json!(["tok:other"])))})).await;
        assert_eq!(r["type"], "refreshed", "{r}");
        assert_eq!(c.request(json!({"type": "subscribe", "room": "tok:other"})).await["type"], "subscribed");
        assert_error(&c.request(json!({"type": "subscribe", "room": "tok:exact"})).await, 103);
        assert_alive(&mut c).await;
        // Without the claim, nothing in the namespace.
        let mut d = connected_as(&url, enc, &hs(&claims("dave", 600))).await;
        assert_error(&d.request(json!({"type": "subscribe", "room": "tok:exact"})).await, 103);
    }
}

#[tokio::test]
async fn subscription_tokens_and_room_info() {
    let node = start_auth_node(&[]);
    let url = node.ws_url();
    for enc in Enc::BOTH {
        let room = format!("tok:room-{}", unique());
        let sub_token = |sub: &str, room: &str, ttl: i64, info: Value| {
            hs(&json!({"sub": sub, "room": room, "exp": now() + ttl, "aud": AUD, "iss": ISS, "info": info}))
        };
        // A watcher with the rooms claim sees who joins, with room_info.
        let mut w =
            connected_as(&url, enc, &hs(&with(claims("watcher", 600), "rooms", json!([room.clone()])))).await;
        assert_eq!(w.request(json!({"type": "subscribe", "room": room})).await["type"], "subscribed");

        let mut c =
            connected_as(&url, enc, &rs(&with(claims("alice", 600), "info", json!({"n": "Alice"})))).await;
        // Missing: 103. For another room, another user, expired, forged: 101 / 109.
        assert_error(&c.request(json!({"type": "subscribe", "room": room})).await, 103);
        let other_room = sub_token("alice", "tok:elsewhere", 600, json!(null));
        assert_error(&c.request(json!({"type": "subscribe", "room": room, "token": other_room})).await, 101);
        let other_user = sub_token("bob", &room, 600, json!(null));
        assert_error(&c.request(json!({"type": "subscribe", "room": room, "token": other_user})).await, 101);
        let expired = sub_token("alice", &room, -10, json!(null));
        assert_error(&c.request(json!({"type": "subscribe", "room": room, "token": expired})).await, 109);
        let forged = sign(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(b"not-the-secret-not-the-secret-not-the-secret"),
            &json!({"sub": "alice", "room": room, "exp": now() + 600, "aud": AUD, "iss": ISS}),
        );
        assert_error(&c.request(json!({"type": "subscribe", "room": room, "token": forged})).await, 101);
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none"})),
            b64(&json!({"sub": "alice", "room": room, "exp": now() + 600}))
        );
        assert_error(&c.request(json!({"type": "subscribe", "room": room, "token": none})).await, 101);
        // The connection token is not a subscription token.
        let conn_token = hs(&claims("alice", 600));
        assert_error(&c.request(json!({"type": "subscribe", "room": room, "token": conn_token})).await, 101);
        assert_alive(&mut c).await;
        assert!(w.take_buffered().iter().all(|m| m["type"] != "join"), "no join for refused subscribes");

        // The right token: subscribed; room_info shows in presence and in the join.
        let good = sub_token("alice", &room, 600, json!({"role": "moderator"}));
        let r = c.request(json!({"type": "subscribe", "room": room, "token": good, "presence": true})).await;
        assert_eq!(r["type"], "subscribed", "{r}");
        let me = r["members"].as_array().unwrap().iter().find(|m| m["user"] == "alice").cloned().unwrap();
        assert_eq!(
            (me["info"].clone(), me["room_info"].clone()),
            (json!({"n": "Alice"}), json!({"role": "moderator"}))
        );
        let j = w.recv_type("join").await;
        assert_eq!(j["member"]["room_info"], json!({"role": "moderator"}), "{j}");
        assert_eq!(j["member"]["info"], json!({"n": "Alice"}), "{j}");
        let p = w.request(json!({"type": "presence", "room": room})).await;
        let alice = p["members"].as_array().unwrap().iter().find(|m| m["user"] == "alice").cloned().unwrap();
        assert_eq!(alice["room_info"], json!({"role": "moderator"}), "{p}");
        let watcher =
            p["members"].as_array().unwrap().iter().find(|m| m["user"] == "watcher").cloned().unwrap();
        assert!(watcher.get("room_info").is_none(), "{p}");
        // Leave carries it too.
        c.request(json!({"type": "unsubscribe", "room": room})).await;
        let l = w.recv_type("leave").await;
        assert_eq!(l["member"]["room_info"], json!({"role": "moderator"}), "{l}");
    }
    assert_serves(&url).await;
}

#[tokio::test]
async fn keys_from_a_jwks_file_with_rotation() {
    let path =
        std::env::temp_dir().join(format!("roomcast-test-{}-{}-jwks.json", std::process::id(), unique()));
    let jwks = |keys: &[(&str, Algorithm, &str)]| {
        let set = JwkSet {
            keys: keys
                .iter()
                .map(|(kid, alg, file)| {
                    let k = match alg {
                        Algorithm::RS256 => EncodingKey::from_rsa_pem(&key(file)).unwrap(),
                        _ => EncodingKey::from_ed_pem(&key(file)).unwrap(),
                    };
                    let mut jwk = Jwk::from_encoding_key(&k, *alg).unwrap();
                    jwk.common.key_id = Some(kid.to_string());
                    jwk
                })
                .collect(),
        };
        serde_json::to_string(&set).unwrap()
    };
    std::fs::write(&path, jwks(&[("r1", Algorithm::RS256, "rsa_private.pem")])).unwrap();
    let config = format!("[auth]\njwks_file = \"{}\"\njwks_min_refresh_ms = 0\n", path.display());
    let node = NodeProc::start(NodeOptions::with_config(&config));
    let url = node.ws_url();
    let c = json!({"sub": "alice", "exp": now() + 600});
    let rsa1 = EncodingKey::from_rsa_pem(&key("rsa_private.pem")).unwrap();
    let rsa2 = EncodingKey::from_rsa_pem(&key("rsa2_private.pem")).unwrap();
    connected_as(&url, Enc::Json, &sign(Algorithm::RS256, Some("r1"), &rsa1, &c)).await;
    // Unknown kid, and a known kid with another key's signature: 101.
    for t in [sign(Algorithm::RS256, Some("r2"), &rsa2, &c), sign(Algorithm::RS256, Some("r1"), &rsa2, &c)] {
        let (mut cl, r) = connect_with(&url, Enc::Json, Some(&t)).await;
        assert_error(&r, 101);
        assert_eq!(cl.expect_close().await.0, 4001);
    }
    // HS256 is never accepted on a JWKS-only node.
    let (_, r) = connect_with(&url, Enc::Json, Some(&hs(&c))).await;
    assert_error(&r, 101);
    // Rotation: the new kid is found by the refresh an unknown kid triggers.
    std::fs::write(
        &path,
        jwks(&[
            ("r2", Algorithm::RS256, "rsa2_private.pem"),
            ("d1", Algorithm::EdDSA, "ed25519_private.pem"),
        ]),
    )
    .unwrap();
    connected_as(&url, Enc::Msgpack, &sign(Algorithm::RS256, Some("r2"), &rsa2, &c)).await;
    let ed = EncodingKey::from_ed_pem(&key("ed25519_private.pem")).unwrap();
    connected_as(&url, Enc::Json, &sign(Algorithm::EdDSA, Some("d1"), &ed, &c)).await;
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn bad_auth_configuration_stops_the_node_before_it_binds() {
    use std::process::{Command, Stdio};
    let cases = [
        (
            "[[auth.keys]]\nalgorithm = \"RS256\"\npem = \"-----BEGIN PUBLIC KEY-----\\nAAAA\\n-----END PUBLIC KEY-----\"\n",
            "auth.keys[0]",
        ),
        (
            "[auth]\nalgorithms = [\"none\"]\nhmac_secret = \"0123456789abcdef0123456789abcdef\"\n",
            "auth.algorithms",
        ),
        ("[auth]\nhmac_secret = \"short\"\n", "auth.hmac_secret"),
        ("trusted_proxies = [\"not-a-network\"]\n", "not an IP network"),
    ];
    for (toml, expected) in cases {
        let path =
            std::env::temp_dir().join(format!("roomcast-test-{}-{}-bad.toml", std::process::id(), unique()));
        std::fs::write(&path, toml).unwrap();
        let mut child = Command::new(roomcast_tests::roomcast_bin())
            .env("ROOMCAST_CONFIG", &path)
            .env("ROOMCAST_LISTEN", "127.0.0.1:0")
            .env_remove("ROOMCAST_JWT_HMAC_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A node that accepted the configuration would run on: give it 10 s to exit.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the node accepted a bad configuration: {toml}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let out = child.wait_with_output().unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(!out.status.success(), "{toml}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stdout.contains("listening"), "{toml}: {stdout}");
        assert!(stderr.contains(expected), "{toml}: expected {expected:?} in {stderr}");
    }
}
