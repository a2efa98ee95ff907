//! Reproduces why a node's memory grows with its backlog: sled 0.34 keeps the pages a full
//! scan reads in memory, beyond `cache_capacity`, and a snapshot is a full scan.
//!
//! `cargo run --release -p hashq-storage --example sled_scan_memory -- DIR [scan]` writes
//! 16 KiB values in batches (as the state machine does) and prints the resident memory
//! after every 156 MiB; with `scan` it also reads the whole tree after each round. Measured
//! here: without `scan` it stays near 100 MiB; with it, it grows with the data (about
//! 0.9 GiB after 937 MiB).

fn rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "VmRSS: unknown".into())
}

fn main() -> Result<(), sled::Error> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "sled-scan-memory".into());
    let scan = args.next().as_deref() == Some("scan");
    let db = sled::Config::new()
        .path(&dir)
        .cache_capacity(8 << 20)
        .open()?;
    let tree = db.open_tree("sm")?;
    let value = vec![7u8; 16 << 10];
    for round in 0..6u64 {
        for batch_no in 0..(10_000 / 32) {
            let mut batch = sled::Batch::default();
            for i in 0..32u64 {
                let key = (round * 10_000 + batch_no * 32 + i).to_be_bytes();
                batch.insert(&key, value.clone());
            }
            tree.apply_batch(batch)?;
        }
        if scan {
            let mut bytes = 0usize;
            for pair in tree.iter() {
                bytes += pair?.1.len();
            }
            assert!(bytes > 0);
        }
        db.flush()?;
        println!("after {} MiB: {}", (round + 1) * 10_000 * 16 / 1024, rss());
    }
    Ok(())
}
