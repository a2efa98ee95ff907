//! Unit tests of the in-memory model (no FUSE involved).

use std::ffi::OsStr;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::model::{Ino, Model, Op, When, ROOT};

struct Tmp(PathBuf);

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn model() -> (Model, Tmp) {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "hashq-faultfs-unit-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).unwrap();
    (Model::new(&dir).unwrap(), Tmp(dir))
}

fn n(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Creates `name` in `parent` and returns (ino, open handle).
fn create(m: &mut Model, parent: Ino, name: &str) -> (Ino, u64) {
    let (a, fh) = m
        .create(parent, n(name), 0o644, libc::O_RDWR, 0, 0)
        .unwrap();
    (a.ino, fh)
}

fn content(m: &mut Model, path: &str) -> Vec<u8> {
    let ino = m.resolve(path).unwrap();
    m.read_all(ino).unwrap()
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn unsynced_write_lost_synced_survives_only_with_dir_sync() {
    let (mut m, _t) = model();
    let (a, fa) = create(&mut m, ROOT, "a");
    m.write(fa, 0, b"synced").unwrap();
    m.fsync(fa).unwrap();
    m.fsyncdir(ROOT).unwrap();
    m.write(fa, 6, b" and not").unwrap();
    let (_b, fb) = create(&mut m, ROOT, "b");
    m.write(fb, 0, b"file synced, dir not").unwrap();
    m.fsync(fb).unwrap();
    assert_eq!(content(&mut m, "a"), b"synced and not");
    m.cut("").unwrap();
    // Dead until revived, through old handles and new lookups alike.
    assert_eq!(m.read(fa, 0, 10), Err(libc::EIO));
    assert_eq!(m.getattr(a).err(), Some(libc::EIO));
    m.revive("").unwrap();
    assert_eq!(
        m.read(fa, 0, 10),
        Err(libc::EIO),
        "old handle stays invalid"
    );
    assert_eq!(content(&mut m, "a"), b"synced");
    assert_eq!(m.list("").unwrap(), vec!["a"]);
    assert_eq!(m.backing_files(), 1, "b's backing data is deleted");
}

#[test]
fn new_dir_needs_parent_sync_and_own_sync() {
    let (mut m, _t) = model();
    let d = m.mkdir(ROOT, n("d"), 0o755, 0, 0).unwrap().ino;
    let (_, f) = create(&mut m, d, "f");
    m.fsync(f).unwrap();
    m.fsyncdir(d).unwrap();
    m.cut("").unwrap();
    m.revive("").unwrap();
    assert!(m.list("").unwrap().is_empty(), "parent never synced");

    let d = m.mkdir(ROOT, n("d"), 0o755, 0, 0).unwrap().ino;
    let (_, f) = create(&mut m, d, "f");
    m.write(f, 0, b"x").unwrap();
    m.fsync(f).unwrap();
    m.fsyncdir(ROOT).unwrap();
    m.cut("").unwrap();
    m.revive("").unwrap();
    assert_eq!(m.list("").unwrap(), vec!["d"]);
    assert!(m.list("d").unwrap().is_empty(), "d itself never synced");
}

#[test]
fn rename_durable_per_directory() {
    let (mut m, _t) = model();
    let a = m.mkdir(ROOT, n("a"), 0o755, 0, 0).unwrap().ino;
    let b = m.mkdir(ROOT, n("b"), 0o755, 0, 0).unwrap().ino;
    m.fsyncdir(ROOT).unwrap();
    let (_, f) = create(&mut m, a, "x");
    m.write(f, 0, b"old").unwrap();
    m.fsync(f).unwrap();
    m.fsyncdir(a).unwrap();
    m.release(f);
    // Replace x atomically with a new version, then move it across directories.
    let (_, t) = create(&mut m, a, "x.tmp");
    m.write(t, 0, b"new").unwrap();
    m.fsync(t).unwrap();
    m.release(t);
    m.rename(a, n("x.tmp"), a, n("x"), 0).unwrap();
    m.cut("").unwrap();
    m.revive("").unwrap();
    assert_eq!(content(&mut m, "a/x"), b"old");
    assert_eq!(m.list("a").unwrap(), vec!["x"]);

    let (_, t) = create(&mut m, a, "x.tmp");
    m.write(t, 0, b"new").unwrap();
    m.fsync(t).unwrap();
    m.rename(a, n("x.tmp"), a, n("x"), 0).unwrap();
    m.fsyncdir(a).unwrap();
    m.rename(a, n("x"), b, n("y"), 0).unwrap();
    // Only the destination directory is synced: the file shows up in both.
    m.fsyncdir(b).unwrap();
    m.cut("").unwrap();
    m.revive("").unwrap();
    assert_eq!(content(&mut m, "a/x"), b"new");
    assert_eq!(content(&mut m, "b/y"), b"new");
    assert_eq!(m.getattr(m.resolve("b/y").unwrap()).unwrap().nlink, 2);
    // NOREPLACE refuses; RENAME_WHITEOUT is not supported.
    assert_eq!(
        m.rename(a, n("x"), b, n("y"), libc::RENAME_NOREPLACE),
        Err(libc::EEXIST)
    );
    assert_eq!(
        m.rename(a, n("x"), b, n("z"), libc::RENAME_WHITEOUT),
        Err(libc::EINVAL)
    );
}

#[test]
fn unlink_and_rmdir_durable_only_after_fsyncdir() {
    let (mut m, _t) = model();
    let d = m.mkdir(ROOT, n("d"), 0o755, 0, 0).unwrap().ino;
    let (_, f) = create(&mut m, ROOT, "f");
    m.write(f, 0, b"keep").unwrap();
    m.fsync(f).unwrap();
    m.release(f);
    m.fsyncdir(ROOT).unwrap();
    m.unlink(ROOT, n("f")).unwrap();
    m.rmdir(ROOT, n("d")).unwrap();
    assert!(m.list("").unwrap().is_empty());
    m.cut("").unwrap();
    m.revive("").unwrap();
    assert_eq!(m.list("").unwrap(), vec!["d", "f"]);
    assert_eq!(content(&mut m, "f"), b"keep");
    m.unlink(ROOT, n("f")).unwrap();
    m.fsyncdir(ROOT).unwrap();
    assert_eq!(m.backing_files(), 0, "durably unlinked data is freed");
    m.cut("").unwrap();
    m.revive("").unwrap();
    assert_eq!(m.list("").unwrap(), vec!["d"]);
    let _ = d;
}

#[test]
fn rmdir_not_empty_and_unlinked_open_file() {
    let (mut m, _t) = model();
    let d = m.mkdir(ROOT, n("d"), 0o755, 0, 0).unwrap().ino;
    let (_, f) = create(&mut m, d, "f");
    assert_eq!(m.rmdir(ROOT, n("d")), Err(libc::ENOTEMPTY));
    m.write(f, 0, b"still here").unwrap();
    m.unlink(d, n("f")).unwrap();
    assert_eq!(m.read(f, 0, 100).unwrap(), b"still here");
    assert_eq!(m.stats().files, 1);
    m.release(f);
    assert_eq!(m.stats().files, 0, "freed once closed");

    // A whole-FS cut also kills open, unlinked files.
    let (_, g) = create(&mut m, ROOT, "g");
    m.unlink(ROOT, n("g")).unwrap();
    m.cut("/").unwrap();
    assert_eq!(m.read(g, 0, 1), Err(libc::EIO));
    assert_eq!(m.stats().files, 0);
    assert_eq!(m.stats().dead, vec!["/".to_string()]);
}

/// One file driven by random writes, truncates, fallocates and syncs, checked against a
/// flat model of its durable and current bytes, then cut.
#[test]
fn random_file_ops_match_flat_model() {
    for seed in 1..=20u64 {
        let (mut m, _t) = model();
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let (ino, fh) = create(&mut m, ROOT, "f");
        m.fsyncdir(ROOT).unwrap();
        let mut cur: Vec<u8> = Vec::new();
        let mut dur: Vec<u8> = Vec::new();
        for step in 0..300 {
            match rng.below(10) {
                0..=4 => {
                    let off = rng.below(9000) as usize;
                    let len = rng.below(3000) as usize;
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8 | 1).collect();
                    m.write(fh, off as u64, &data).unwrap();
                    if cur.len() < off + len {
                        cur.resize(off + len, 0);
                    }
                    cur[off..off + len].copy_from_slice(&data);
                }
                5 | 6 => {
                    let len = rng.below(10000) as usize;
                    m.truncate(ino, len as u64).unwrap();
                    cur.resize(len, 0);
                }
                7 => {
                    let end = rng.below(10000);
                    m.fallocate(fh, end / 2, end - end / 2, 0).unwrap();
                    if cur.len() < end as usize {
                        cur.resize(end as usize, 0);
                    }
                }
                _ => {
                    m.fsync(fh).unwrap();
                    dur = cur.clone();
                }
            }
            assert_eq!(m.read_all(ino).unwrap(), cur, "seed {seed} step {step}");
            assert_eq!(m.read_durable(ino).unwrap(), dur, "seed {seed} step {step}");
            // Reads at odd offsets and lengths, including past the end.
            for _ in 0..3 {
                let off = rng.below(cur.len() as u64 + 50);
                let len = rng.below(5000) as u32;
                let want: Vec<u8> = cur
                    .iter()
                    .skip(off as usize)
                    .take(len as usize)
                    .copied()
                    .collect();
                assert_eq!(m.read(fh, off, len).unwrap(), want);
            }
        }
        m.cut("").unwrap();
        m.revive("").unwrap();
        assert_eq!(content(&mut m, "f"), dur, "seed {seed} after cut");
    }
}

#[test]
fn dead_subtree_and_sibling_untouched() {
    let (mut m, _t) = model();
    let a = m.mkdir(ROOT, n("a"), 0o755, 0, 0).unwrap().ino;
    let b = m.mkdir(ROOT, n("b"), 0o755, 0, 0).unwrap().ino;
    m.fsyncdir(ROOT).unwrap();
    let (_, fa) = create(&mut m, a, "f");
    let (_, fb) = create(&mut m, b, "f");
    m.write(fa, 0, b"lost").unwrap();
    m.write(fb, 0, b"kept").unwrap();
    m.cut("a").unwrap();
    assert_eq!(m.lookup(ROOT, n("a")).err(), Some(libc::EIO));
    assert_eq!(m.write(fa, 0, b"x"), Err(libc::EIO));
    assert_eq!(m.read(fb, 0, 10).unwrap(), b"kept");
    assert_eq!(m.stats().dead, vec!["a".to_string()]);
    m.revive("a").unwrap();
    assert!(m.stats().dead.is_empty());
    assert!(m.list("a").unwrap().is_empty());
    assert_eq!(content(&mut m, "b/f"), b"kept");
}

#[test]
fn triggers_fire_on_matching_op() {
    let (mut m, _t) = model();
    let d = m.mkdir(ROOT, n("d"), 0o755, 0, 0).unwrap().ino;
    m.fsyncdir(ROOT).unwrap();
    let (_, f) = create(&mut m, d, "wal");
    m.write(f, 0, b"entry").unwrap();
    let id = m.arm(When::Instead, Op::Fsync, "d/wal", "");
    m.fsyncdir(d).unwrap(); // different op: no effect on the trigger
    assert!(m.fired().is_empty());
    assert_eq!(m.fsync(f), Err(libc::EIO));
    assert_eq!(m.fired()[0].id, id);
    assert_eq!(m.fired()[0].path, "d/wal");
    m.revive("").unwrap();
    assert_eq!(content(&mut m, "d/wal"), b"", "fsync never happened");

    let (_, f) = create(&mut m, d, "snap");
    m.write(f, 0, b"snapshot").unwrap();
    m.arm(When::After, Op::Fsync, "d/", "d");
    m.fsync(f).unwrap();
    assert_eq!(m.getattr(m.resolve("d").unwrap()).err(), Some(libc::EIO));
    m.revive("d").unwrap();
    // d's entry for snap was never synced (only the file was): it is gone.
    assert_eq!(m.list("d").unwrap(), vec!["wal"]);
}

#[test]
fn fail_injection_and_failed_fsync_syncs_nothing() {
    let (mut m, _t) = model();
    let (ino, f) = create(&mut m, ROOT, "f");
    m.fsyncdir(ROOT).unwrap();
    m.fail(Op::Write, "f", libc::ENOSPC, Some(1));
    assert_eq!(m.write(f, 0, b"abc"), Err(libc::ENOSPC));
    m.write(f, 0, b"abc").unwrap();
    m.fail(Op::Fsync, "", libc::EIO, None);
    assert_eq!(m.fsync(f), Err(libc::EIO));
    assert_eq!(m.fsync(f), Err(libc::EIO));
    assert_eq!(m.read_durable(ino).unwrap(), b"");
    assert_eq!(m.read_all(ino).unwrap(), b"abc", "dirty data stays dirty");
    m.clear();
    m.fsync(f).unwrap();
    assert_eq!(m.read_durable(ino).unwrap(), b"abc");
}

#[test]
fn space_limit() {
    let (mut m, _t) = model();
    let (ino, f) = create(&mut m, ROOT, "f");
    m.write(f, 0, &[1; 100]).unwrap();
    m.set_space(Some(50));
    assert_eq!(m.space(), Some((150, 50)));
    assert_eq!(m.write(f, 100, &[1; 51]), Err(libc::ENOSPC));
    assert_eq!(m.truncate(ino, 151), Err(libc::ENOSPC));
    m.write(f, 100, &[1; 50]).unwrap();
    assert_eq!(m.space(), Some((150, 0)));
    m.write(f, 0, &[2; 150]).unwrap(); // overwriting needs no space
    m.set_space(None);
    m.write(f, 150, &[1; 51]).unwrap();
}

#[test]
fn torn_write_and_flip() {
    let (mut m, _t) = model();
    let (ino, f) = create(&mut m, ROOT, "f");
    m.fsyncdir(ROOT).unwrap();
    m.write(f, 0, b"0123456789").unwrap();
    m.fsync(f).unwrap();
    m.write(f, 2, b"ab").unwrap(); // dropped: not the last write
    m.write(f, 8, b"ABCDEFGH").unwrap(); // last: half of it lands
    m.torn("f").unwrap();
    m.cut("").unwrap();
    m.revive("").unwrap();
    assert_eq!(content(&mut m, "f"), b"01234567ABCD");

    // Flip in the durable region, in a dirty region, and in a zero-filled extension.
    m.flip("f", 0, 0).unwrap();
    let f = m.open(ino, libc::O_RDWR).unwrap();
    m.write(f, 1, b"x").unwrap();
    m.flip("f", 1, 1).unwrap();
    m.truncate(ino, 20).unwrap();
    m.flip("f", 15, 7).unwrap();
    let cur = m.read_all(ino).unwrap();
    assert_eq!(cur[0], b'0' ^ 1);
    assert_eq!(cur[1], b'x' ^ 2);
    assert_eq!(cur[15], 0x80);
    assert_eq!(cur.len(), 20);
    let dur = m.read_durable(ino).unwrap();
    assert_eq!(dur[0], b'0' ^ 1);
    assert_eq!(dur[1], b'1' ^ 2);
    assert_eq!(dur.len(), 12);
}

#[test]
fn hard_links_follow_their_directory() {
    let (mut m, _t) = model();
    let a = m.mkdir(ROOT, n("a"), 0o755, 0, 0).unwrap().ino;
    let b = m.mkdir(ROOT, n("b"), 0o755, 0, 0).unwrap().ino;
    m.fsyncdir(ROOT).unwrap();
    let (ino, f) = create(&mut m, a, "f");
    m.write(f, 0, b"linked").unwrap();
    m.fsync(f).unwrap();
    m.fsyncdir(a).unwrap();
    m.link(ino, b, n("g")).unwrap();
    assert_eq!(m.getattr(ino).unwrap().nlink, 2);
    m.cut("").unwrap();
    m.revive("").unwrap();
    assert!(m.list("b").unwrap().is_empty());
    m.link(ino, b, n("g")).unwrap();
    m.fsyncdir(b).unwrap();
    m.unlink(a, n("f")).unwrap();
    m.fsyncdir(a).unwrap();
    m.cut("").unwrap();
    m.revive("").unwrap();
    assert!(m.list("a").unwrap().is_empty());
    assert_eq!(content(&mut m, "b/g"), b"linked");
}
