#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A deterministic, stable-toolchain stand-in for the cargo-fuzz targets in `fuzz/`:
//! random and mutated frames through the decoder, checking it never panics and that
//! whatever decodes round-trips. Runs in every `cargo test`.

use roomcast_protocol::{Encode, Encoding, decode_requests, decode_server_messages};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const SEEDS_JSON: &[&str] = &[
    r#"{"type":"connect","id":1,"name":"x","data":{"a":[1,2]}}"#,
    r#"{"type":"subscribe","id":2,"room":"chat:a","recover":{"offset":3,"epoch":"e"},"presence":true}"#,
    r#"{"type":"publish","id":3,"room":"a","data":"x","skip_self":true}"#,
    r#"{"type":"history","id":4,"room":"a","since":{"offset":1,"epoch":"e"},"limit":2,"reverse":true}"#,
    r#"{"type":"rpc","id":5,"method":"m","data":null}"#,
    "{\"type\":\"pong\"}\n{\"type\":\"presence\",\"id\":9,\"room\":\"r\"}",
];

fn check(enc: Encoding, frame: &[u8]) {
    for item in decode_requests(enc, frame) {
        if let Ok(Ok(req)) = item {
            for out in [Encoding::Json, Encoding::Msgpack] {
                let bytes = req.encode(out).expect("a decoded request encodes");
                let again = decode_requests(out, &bytes);
                assert_eq!(again.into_iter().next(), Some(Ok(Ok(req.clone()))), "{out:?} {frame:?}");
            }
        }
    }
    let _ = decode_server_messages(enc, frame);
}

#[test]
fn mutated_frames_never_panic_and_round_trip() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut seeds: Vec<(Encoding, Vec<u8>)> = Vec::new();
    for s in SEEDS_JSON {
        seeds.push((Encoding::Json, s.as_bytes().to_vec()));
        for line in s.split('\n') {
            let reqs = decode_requests(Encoding::Json, line.as_bytes());
            if let Some(Ok(Ok(r))) = reqs.into_iter().next() {
                seeds.push((Encoding::Msgpack, r.encode(Encoding::Msgpack).unwrap().to_vec()));
            }
        }
    }
    for _ in 0..30_000 {
        let (enc, seed) = &seeds[rng.below(seeds.len())];
        let mut f = seed.clone();
        for _ in 0..=rng.below(4) {
            match rng.below(4) {
                0 if !f.is_empty() => {
                    let i = rng.below(f.len());
                    f[i] = rng.next() as u8;
                }
                1 if !f.is_empty() => {
                    let i = rng.below(f.len());
                    f.truncate(i);
                }
                2 => {
                    let i = rng.below(f.len() + 1);
                    f.insert(i, rng.next() as u8);
                }
                _ => {
                    let i = rng.below(f.len() + 1);
                    let other = &seeds[rng.below(seeds.len())].1;
                    f.splice(i..i, other.iter().copied());
                }
            }
        }
        check(*enc, &f);
    }
    for _ in 0..5_000 {
        let n = rng.below(64);
        let f: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        check(Encoding::Msgpack, &f);
        check(Encoding::Json, &f);
    }
}
