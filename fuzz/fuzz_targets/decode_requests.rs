//! The message decoder on arbitrary frames: never panics, and whatever decodes encodes
//! back to something that decodes to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast_protocol::{Encode, Encoding, decode_requests, decode_server_messages};

fuzz_target!(|input: &[u8]| {
    let Some((&selector, frame)) = input.split_first() else {
        return;
    };
    let enc = if selector & 1 == 0 { Encoding::Json } else { Encoding::Msgpack };
    for item in decode_requests(enc, frame) {
        if let Ok(Ok(req)) = item {
            for out in [Encoding::Json, Encoding::Msgpack] {
                let bytes = req.encode(out).expect("a decoded request encodes");
                let again = decode_requests(out, &bytes);
                assert_eq!(again.len(), 1);
                assert_eq!(again.into_iter().next(), Some(Ok(Ok(req.clone()))));
            }
        }
    }
    let _ = decode_server_messages(enc, frame);
});
