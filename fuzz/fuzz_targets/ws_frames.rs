//! The WebSocket frame reader (masking, fragmentation, control frames, deflate) on
//! arbitrary bytes: never panics, never yields a message over the limit.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use roomcast_gateway::ws::frame::{Incoming, MessageReader};

fuzz_target!(|input: &[u8]| {
    let Some((&selector, data)) = input.split_first() else {
        return;
    };
    let max = 1024;
    let mut reader = MessageReader::new(max, selector & 1 == 1);
    // Feed in chunks whose size depends on the selector, as a socket would.
    let chunk = (selector as usize >> 1).max(1);
    let mut buf = BytesMut::new();
    for part in data.chunks(chunk) {
        buf.extend_from_slice(part);
        loop {
            match reader.next(&mut buf) {
                Ok(Some(Incoming::Message { payload, .. })) => assert!(payload.len() <= max),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
});
