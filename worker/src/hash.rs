//! The iterated SHA-512 work function.
//!
//! `value = sha512(payload)`, then `value = sha512(value)` another `iterations - 1` times.
//!
//! Every iteration after the first hashes exactly 64 bytes, which SHA-512 pads to a single
//! 128-byte block: the digest in bytes 0..64, `0x80` at byte 64, zeros, and the message length
//! (512 bits) as a 128-bit big-endian integer in bytes 112..128. The hot loop therefore builds
//! that block once and runs only the SHA-512 compression function per iteration, writing each
//! result straight back into the first half of the block.
//!
//! The compression function is AWS-LC's `SHA512_Transform` (via the `aws-lc-sys` crate), which
//! runs AWS-LC's hand-tuned assembly with runtime CPU dispatch. It was chosen by measurement
//! against RustCrypto `sha2` (0.10 and 0.11, `compress512`, with and without `asm`), `ring`,
//! `aws-lc-rs`, `graviola` and `sha2-asm`: it was the fastest of them on the x86_64 machines
//! this project runs on. The tests check it against RustCrypto `sha2` as an independent
//! reference.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aws_lc_sys::{SHA512_Init, SHA512_Transform, SHA512, SHA512_CTX};

/// How many iterations [`sha512_chain_cancellable`] runs between two checks of its cancel
/// flag: about a millisecond of work on current x86_64 cores.
pub const CANCEL_CHECK_EVERY: u32 = 4096;

/// Bytes in a SHA-512 digest.
const DIGEST_LEN: usize = 64;

/// Bytes in a SHA-512 block.
const BLOCK_LEN: usize = 128;

/// The state of one chain: the padded block whose first 64 bytes hold the current value.
struct Chain {
    /// Only `ctx.h` is used: it is reset to `iv` before and read back after each compression.
    ctx: SHA512_CTX,
    /// The SHA-512 initial hash value, as set by `SHA512_Init`.
    iv: [u64; 8],
    /// The current value (bytes 0..64) followed by the fixed padding for a 64-byte message.
    block: [u8; BLOCK_LEN],
}

impl Chain {
    /// Runs iteration 1 (the hash of the raw payload) and sets up the padded block.
    fn new(payload: &[u8]) -> Self {
        // SAFETY: SHA512_CTX is a plain C struct of integers and bytes, for which all zeros is a
        // valid value; SHA512_Init then fully initialises it.
        let mut ctx: SHA512_CTX = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is a valid, exclusively borrowed SHA512_CTX.
        let ok = unsafe { SHA512_Init(&mut ctx) };
        debug_assert_eq!(ok, 1);
        let iv = ctx.h;

        let mut block = [0u8; BLOCK_LEN];
        // SAFETY: `payload` is valid for reads of `payload.len()` bytes (a zero length is never
        // dereferenced) and `block` is valid for writes of the 64 output bytes.
        unsafe { SHA512(payload.as_ptr(), payload.len(), block.as_mut_ptr()) };
        block[DIGEST_LEN] = 0x80;
        // Message length in bits, 512 = 0x0200, big-endian in the last 16 bytes.
        block[BLOCK_LEN - 2] = 0x02;
        Chain { ctx, iv, block }
    }

    /// Runs `n` further iterations.
    #[inline(always)]
    fn run(&mut self, n: u32) {
        for _ in 0..n {
            self.ctx.h = self.iv;
            // SAFETY: `ctx` is a valid SHA512_CTX and `block` is exactly one 128-byte block;
            // SHA512_Transform reads the block and updates only `ctx.h`.
            unsafe { SHA512_Transform(&mut self.ctx, self.block.as_ptr()) };
            for (out, word) in self.block[..DIGEST_LEN].chunks_exact_mut(8).zip(self.ctx.h) {
                out.copy_from_slice(&word.to_be_bytes());
            }
        }
    }

    /// The current value.
    fn value(&self) -> [u8; DIGEST_LEN] {
        let mut out = [0u8; DIGEST_LEN];
        out.copy_from_slice(&self.block[..DIGEST_LEN]);
        out
    }
}

/// Lowercase hex of the result, 128 chars.
///
/// See [`sha512_chain`] for the function computed.
pub fn sha512_chain_hex(payload: &[u8], iterations: u32) -> String {
    hex::encode(sha512_chain(payload, iterations))
}

/// The raw 64-byte result: `sha512(payload)`, then `iterations - 1` more times `sha512` of the
/// previous 64-byte digest.
///
/// `iterations` of 0 is treated as 1.
pub fn sha512_chain(payload: &[u8], iterations: u32) -> [u8; 64] {
    let mut chain = Chain::new(payload);
    chain.run(iterations.saturating_sub(1));
    chain.value()
}

/// Same as [`sha512_chain`], but checks `cancel` before starting and then every
/// [`CANCEL_CHECK_EVERY`] iterations, and returns `None` if it was set (a worker abandons work
/// whose lease was lost).
///
/// The check is one relaxed atomic load per [`CANCEL_CHECK_EVERY`] iterations, which costs no
/// measurable speed. Work that finishes before a check sees the flag returns `Some`.
pub fn sha512_chain_cancellable(
    payload: &[u8],
    iterations: u32,
    cancel: &AtomicBool,
) -> Option<[u8; 64]> {
    if cancel.load(Ordering::Relaxed) {
        return None;
    }
    let mut chain = Chain::new(payload);
    let mut remaining = iterations.saturating_sub(1);
    while remaining > 0 {
        if cancel.load(Ordering::Relaxed) {
            return None;
        }
        let n = remaining.min(CANCEL_CHECK_EVERY);
        chain.run(n);
        remaining -= n;
    }
    Some(chain.value())
}

/// Measure this machine's chain rate (iterations/s) for about `dur`, single thread: used by
/// `hashq bench`.
///
/// Runs the same loop as [`sha512_chain`] on the calling thread, in batches, until `dur` of wall
/// time has passed (at least one batch), after a short untimed warm-up.
pub fn measure_rate(dur: Duration) -> f64 {
    const BATCH: u32 = 16 * 1024;
    let mut chain = Chain::new(black_box(b"hashq bench"));
    chain.run(BATCH); // Warm-up: CPU feature dispatch, caches, clock ramp-up.
    let start = Instant::now();
    let mut done: u64 = 0;
    loop {
        chain.run(black_box(BATCH));
        done += u64::from(BATCH);
        let elapsed = start.elapsed();
        if elapsed >= dur {
            black_box(chain.value());
            return done as f64 / elapsed.as_secs_f64();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha512};
    use std::sync::Arc;
    use std::thread;

    const HELLO_1: &str = "9b71d224bd62f3785d96d46ad3ea3d73319bfbc2890caadae2dff72519673ca7\
                           2323c3d99ba5c11d7c7acc6e14b8c5da0c4663475c2e5c3adef46f73bcdec043";
    const HELLO_2: &str = "0592a10584ffabf96539f3d780d776828c67da1ab5b169e9e8aed838aaecc9ed\
                           36d49ff1423c55f019e050c66c6324f53588be88894fef4dcffdb74b98e2b200";
    const HELLO_1000: &str = "2f0d1593c9d82cc06935e69e4e8b230db1240f63a5ae7977d1a8517397895f72\
                              72544c5410618deeab6f6720c33b3b3a73ea0445c72127be8814bb4d07ff616e";
    const EMPTY_1: &str = "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce\
                           47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e";

    /// The work function written the plain way, with RustCrypto `sha2`.
    fn reference(payload: &[u8], iterations: u32) -> [u8; 64] {
        let mut value: [u8; 64] = Sha512::digest(payload).into();
        for _ in 1..iterations {
            value = Sha512::digest(value).into();
        }
        value
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + 7) as u8).collect()
    }

    #[test]
    fn reference_values() {
        assert_eq!(sha512_chain_hex(b"hello", 1), HELLO_1);
        assert_eq!(sha512_chain_hex(b"hello", 2), HELLO_2);
        assert_eq!(sha512_chain_hex(b"hello", 1000), HELLO_1000);
        assert_eq!(sha512_chain_hex(b"", 1), EMPTY_1);
        assert_eq!(hex::encode(reference(b"hello", 1000)), HELLO_1000);
    }

    #[test]
    fn hex_is_lowercase_128_chars() {
        let h = sha512_chain_hex(b"hello", 3);
        assert_eq!(h.len(), 128);
        assert!(h
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(h, hex::encode(sha512_chain(b"hello", 3)));
    }

    #[test]
    fn matches_plain_sha2_loop() {
        for len in [0, 1, 63, 64, 65, 127, 128, 129, 1000, 256 * 1024] {
            let p = payload(len);
            for iterations in [1, 2, 3, 100] {
                assert_eq!(
                    sha512_chain(&p, iterations),
                    reference(&p, iterations),
                    "len {len}, iterations {iterations}"
                );
            }
        }
    }

    #[test]
    fn zero_iterations_is_one() {
        assert_eq!(sha512_chain(b"hello", 0), sha512_chain(b"hello", 1));
    }

    #[test]
    fn cancellable_matches_when_not_cancelled() {
        let cancel = AtomicBool::new(false);
        for iterations in [
            1,
            2,
            1000,
            CANCEL_CHECK_EVERY,
            CANCEL_CHECK_EVERY + 1,
            2 * CANCEL_CHECK_EVERY + 3,
        ] {
            assert_eq!(
                sha512_chain_cancellable(b"hello", iterations, &cancel),
                Some(sha512_chain(b"hello", iterations)),
                "iterations {iterations}"
            );
        }
        assert_eq!(
            sha512_chain_cancellable(b"hello", 1000, &cancel).map(hex::encode),
            Some(HELLO_1000.to_string())
        );
    }

    #[test]
    fn cancellable_returns_none_when_flag_set() {
        let cancel = AtomicBool::new(true);
        assert_eq!(sha512_chain_cancellable(b"hello", 1, &cancel), None);
        assert_eq!(sha512_chain_cancellable(b"hello", 1000, &cancel), None);
        // Would take many minutes if the flag were not checked.
        assert_eq!(sha512_chain_cancellable(b"hello", u32::MAX, &cancel), None);
    }

    #[test]
    fn cancellable_stops_mid_chain() {
        let cancel = Arc::new(AtomicBool::new(false));
        let worker = {
            let cancel = Arc::clone(&cancel);
            // About 20 minutes of work if it never stopped.
            thread::spawn(move || sha512_chain_cancellable(b"hello", u32::MAX, &cancel))
        };
        thread::sleep(Duration::from_millis(20));
        cancel.store(true, Ordering::Relaxed);
        assert_eq!(worker.join().unwrap(), None);
    }

    #[test]
    fn measure_rate_is_positive() {
        let rate = measure_rate(Duration::from_millis(20));
        assert!(rate.is_finite() && rate > 0.0, "rate {rate}");
    }
}
