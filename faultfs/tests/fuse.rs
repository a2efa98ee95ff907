//! End-to-end tests: the real binary mounted with FUSE, driven with std::fs calls.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};

use common::{assert_eio, assert_errno, crash, mount, names, statvfs, sync_dir, Rng};
use std::process::{Command, Stdio};

use hashq_faultfs::harness::is_mounted;
use hashq_faultfs::Op;

/// Case 1: Unsynced writes are lost, fsynced ones survive — but only if the directory entry was
/// made durable too.
#[test]
fn fsync_file_and_dir() {
    let mut fs = mount();
    let m = fs.mountpoint().to_path_buf();

    let mut f = File::create(m.join("kept")).unwrap();
    f.write_all(b"v1").unwrap();
    f.sync_data().unwrap();
    sync_dir(&m);
    f.write_all(b" unsynced").unwrap();
    assert_eq!(fs::read(m.join("kept")).unwrap(), b"v1 unsynced");

    let mut g = File::create(m.join("orphan")).unwrap();
    g.write_all(b"synced file, unsynced dir").unwrap();
    g.sync_all().unwrap();
    drop((f, g));

    crash(&mut fs, "/");
    assert_eq!(fs::read(m.join("kept")).unwrap(), b"v1");
    assert!(
        !m.join("orphan").exists(),
        "its directory was never fsynced"
    );

    let mut g = File::create(m.join("orphan")).unwrap();
    g.write_all(b"synced file, synced dir").unwrap();
    g.sync_all().unwrap();
    sync_dir(&m);
    drop(g);
    crash(&mut fs, "/");
    assert_eq!(
        fs::read(m.join("orphan")).unwrap(),
        b"synced file, synced dir"
    );

    // O_EXCL and O_APPEND behave.
    let e = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.join("kept"));
    assert_eq!(e.unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
    let mut a = OpenOptions::new()
        .append(true)
        .open(m.join("kept"))
        .unwrap();
    a.write_all(b"+1").unwrap();
    a.write_all(b"+2").unwrap();
    assert_eq!(fs::read(m.join("kept")).unwrap(), b"v1+1+2");
    drop(a);
    fs.shutdown().unwrap();
}

/// Case 2: The write-tmp/fsync/rename pattern is durable only once the directory is fsynced;
/// across directories each side becomes durable on its own.
#[test]
fn rename_needs_dir_fsync() {
    let mut fs = mount();
    let m = fs.mountpoint().to_path_buf();
    fs::create_dir(m.join("d")).unwrap();
    fs::create_dir(m.join("e")).unwrap();
    sync_dir(&m);
    fs::write(m.join("d/final"), b"old").unwrap();
    File::open(m.join("d/final")).unwrap().sync_all().unwrap();
    sync_dir(m.join("d"));

    let replace = |content: &[u8]| {
        let mut t = File::create(m.join("d/tmp")).unwrap();
        t.write_all(content).unwrap();
        t.sync_all().unwrap();
        fs::rename(m.join("d/tmp"), m.join("d/final")).unwrap();
    };
    replace(b"new");
    assert_eq!(fs::read(m.join("d/final")).unwrap(), b"new");
    crash(&mut fs, "/");
    assert_eq!(fs::read(m.join("d/final")).unwrap(), b"old");
    assert_eq!(names(m.join("d")), ["final"]);

    replace(b"new");
    sync_dir(m.join("d"));
    crash(&mut fs, "/");
    assert_eq!(fs::read(m.join("d/final")).unwrap(), b"new");
    assert_eq!(names(m.join("d")), ["final"]);

    // Across directories: only the source directory synced -> the file is nowhere;
    // only the destination synced -> in both; both synced -> moved.
    fs::rename(m.join("d/final"), m.join("e/moved")).unwrap();
    sync_dir(m.join("d"));
    crash(&mut fs, "/");
    assert!(names(m.join("d")).is_empty() && names(m.join("e")).is_empty());

    fs::write(m.join("d/x"), b"x").unwrap();
    sync_dir(m.join("d"));
    fs::rename(m.join("d/x"), m.join("e/y")).unwrap();
    sync_dir(m.join("e"));
    crash(&mut fs, "/");
    assert_eq!(names(m.join("d")), ["x"]);
    assert_eq!(names(m.join("e")), ["y"]);

    fs::rename(m.join("d/x"), m.join("e/z")).unwrap();
    sync_dir(m.join("d"));
    sync_dir(m.join("e"));
    crash(&mut fs, "/");
    assert!(names(m.join("d")).is_empty());
    assert_eq!(names(m.join("e")), ["y", "z"]);

    // Directories move too, and a plain rename replaces atomically.
    fs::create_dir(m.join("e/sub")).unwrap();
    fs::rename(m.join("e/sub"), m.join("d/sub")).unwrap();
    assert_eq!(names(m.join("d")), ["sub"]);
    fs::write(m.join("e/w"), b"w").unwrap();
    fs::rename(m.join("e/w"), m.join("e/z")).unwrap();
    assert_eq!(names(m.join("e")), ["y", "z"]);
    assert_eq!(fs::read(m.join("e/z")).unwrap(), b"w");
    fs.shutdown().unwrap();
}

/// Case 3: unlink (and rmdir) are durable only after fsync of the directory.
#[test]
fn unlink_needs_dir_fsync() {
    let mut fs = mount();
    let m = fs.mountpoint().to_path_buf();
    fs::write(m.join("f"), b"data").unwrap();
    File::open(m.join("f")).unwrap().sync_all().unwrap();
    fs::create_dir(m.join("d")).unwrap();
    sync_dir(&m);
    fs::remove_file(m.join("f")).unwrap();
    fs::remove_dir(m.join("d")).unwrap();
    assert!(names(&m).is_empty());
    crash(&mut fs, "/");
    assert_eq!(names(&m), ["d", "f"]);
    assert_eq!(fs::read(m.join("f")).unwrap(), b"data");

    fs::write(m.join("d/inner"), b"").unwrap();
    assert_errno(fs::remove_dir(m.join("d")), libc::ENOTEMPTY);
    fs::remove_file(m.join("f")).unwrap();
    sync_dir(&m);
    crash(&mut fs, "/");
    assert_eq!(names(&m), ["d"]);
    fs.shutdown().unwrap();
}

/// Case 4: Random writes, truncates, extends and syncs through std::fs, checked against an
/// in-memory model of durable and current content (reads at odd offsets included), then a
/// scoped cut per round.
#[test]
fn random_ops_match_model() {
    let mut fs = mount();
    let m = fs.mountpoint().to_path_buf();
    for seed in 1..=4u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let dir = m.join(format!("p{seed}"));
        fs::create_dir(&dir).unwrap();
        let paths: Vec<_> = (0..3).map(|i| dir.join(format!("f{i}"))).collect();
        let mut files: Vec<File> = paths
            .iter()
            .map(|p| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(p)
                    .unwrap()
            })
            .collect();
        sync_dir(&dir);
        sync_dir(&m);
        let mut cur = vec![Vec::<u8>::new(); 3];
        let mut dur = vec![Vec::<u8>::new(); 3];
        for step in 0..500 {
            let i = rng.below(3) as usize;
            let f = &mut files[i];
            match rng.below(10) {
                0..=3 => {
                    let off = rng.below(20_000) as usize;
                    let len = rng.below(5_000) as usize;
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8 | 1).collect();
                    f.write_all_at(&data, off as u64).unwrap();
                    if cur[i].len() < off + len {
                        cur[i].resize(off + len, 0);
                    }
                    cur[i][off..off + len].copy_from_slice(&data);
                }
                4 | 5 => {
                    let len = rng.below(25_000) as usize;
                    f.set_len(len as u64).unwrap();
                    cur[i].resize(len, 0);
                }
                6 => {
                    f.sync_data().unwrap();
                    dur[i] = cur[i].clone();
                }
                7 => {
                    f.sync_all().unwrap();
                    dur[i] = cur[i].clone();
                }
                _ => {
                    let off = rng.below(cur[i].len() as u64 + 100) as usize;
                    let want = rng
                        .below(6_000)
                        .min(cur[i].len().saturating_sub(off) as u64)
                        as usize;
                    if off >= cur[i].len() {
                        // At or past the end: a read returns nothing.
                        assert_eq!(f.read_at(&mut [0u8; 16], off as u64).unwrap(), 0);
                    } else {
                        let mut buf = vec![0u8; want];
                        f.read_exact_at(&mut buf, off as u64).unwrap();
                        assert_eq!(buf, cur[i][off..off + want], "seed {seed} step {step}");
                    }
                }
            }
            assert_eq!(f.metadata().unwrap().len(), cur[i].len() as u64);
            if step % 50 == 0 {
                assert_eq!(
                    fs::read(&paths[i]).unwrap(),
                    cur[i],
                    "seed {seed} step {step}"
                );
            }
        }
        fs.control().cut(&format!("p{seed}")).unwrap();
        for f in &files {
            assert_eio(f.read_at(&mut [0u8; 1], 0));
        }
        drop(files);
        fs.control().revive(&format!("p{seed}")).unwrap();
        for i in 0..3 {
            assert_eq!(fs::read(&paths[i]).unwrap(), dur[i], "seed {seed} file {i}");
        }
    }
    fs.shutdown().unwrap();
}

/// Case 5: A cut subtree answers EIO to everything until revived (old handles: forever); a cut
/// of one directory leaves its sibling alone, unsynced data included.
#[test]
fn dead_subtree_and_scoped_cut() {
    let mut fs = mount();
    let m = fs.mountpoint().to_path_buf();
    fs::create_dir(m.join("n1")).unwrap();
    fs::create_dir(m.join("n2")).unwrap();
    sync_dir(&m);
    let mut a = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.join("n1/f"))
        .unwrap();
    a.write_all(b"synced").unwrap();
    a.sync_all().unwrap();
    sync_dir(m.join("n1"));
    a.write_all(b" lost").unwrap();
    let mut b = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.join("n2/f"))
        .unwrap();
    b.write_all(b"unsynced sibling").unwrap();

    fs.control().cut("n1").unwrap();
    assert_eio(a.write_all(b"x"));
    assert_eio(a.sync_all());
    assert_eio(a.read_at(&mut [0u8; 4], 0));
    assert_eio(File::open(m.join("n1/f")));
    assert_eio(fs::metadata(m.join("n1")));
    assert_eio(fs::read_dir(m.join("n1")));
    assert_eio(fs::write(m.join("n1/new"), b""));
    assert_eq!(fs.control().stats().unwrap().dead, ["n1"]);
    // The sibling still works, unsynced data and open handle included.
    let mut s = String::new();
    File::open(m.join("n2/f"))
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "unsynced sibling");
    b.write_all_at(b"U", 0).unwrap();

    fs.control().revive("n1").unwrap();
    assert_eio(a.read_at(&mut [0u8; 4], 0));
    assert_eq!(fs::read(m.join("n1/f")).unwrap(), b"synced");
    assert!(fs.control().stats().unwrap().dead.is_empty());
    assert_eq!(fs::read(m.join("n2/f")).unwrap(), b"Unsynced sibling");
    drop((a, b));
    fs.shutdown().unwrap();
}

/// Case 6: Armed cuts fire at exactly the operation they name.
#[test]
fn armed_cuts() {
    let mut fs = mount();
    let m = fs.mountpoint().to_path_buf();
    fs::create_dir(m.join("db")).unwrap();
    sync_dir(&m);
    let mut other = File::create(m.join("db/other")).unwrap();
    let mut wal = File::create(m.join("db/wal")).unwrap();
    sync_dir(m.join("db"));

    let id = fs.control().arm_cut(Op::Fsync, "db/wal", None).unwrap();
    other.write_all(b"o").unwrap();
    other.sync_all().unwrap(); // other path: does not fire
    wal.write_all(b"entry").unwrap(); // other op: does not fire
    assert!(fs.control().fired().unwrap().is_empty());
    assert_eio(wal.sync_data());
    let fired = fs.control().fired().unwrap();
    assert_eq!(
        (fired[0].id, fired[0].op, fired[0].path.as_str()),
        (id, Op::Fsync, "db/wal")
    );
    drop((other, wal));
    fs.control().revive("/").unwrap();
    assert_eq!(
        fs::read(m.join("db/wal")).unwrap(),
        b"",
        "the fsync never ran"
    );
    assert_eq!(fs::read(m.join("db/other")).unwrap(), b"o");

    // The next rename in db: cut (scoped to db) instead of renaming.
    fs.control().clear().unwrap();
    fs::write(m.join("db/snap.tmp"), b"s").unwrap();
    File::open(m.join("db/snap.tmp"))
        .unwrap()
        .sync_all()
        .unwrap();
    sync_dir(m.join("db"));
    fs.control().arm_cut(Op::Rename, "db/", Some("db")).unwrap();
    assert_eio(fs::rename(m.join("db/snap.tmp"), m.join("db/snap")));
    assert_eq!(fs.control().fired().unwrap()[0].path, "db/snap.tmp");
    assert_eq!(fs.control().stats().unwrap().dead, ["db"]);
    fs.control().revive("db").unwrap();
    assert_eq!(names(m.join("db")), ["other", "snap.tmp", "wal"]);

    // cut-after: the fsync completes (and is durable), then the power goes.
    let mut f = File::create(m.join("db/log")).unwrap();
    sync_dir(m.join("db"));
    f.write_all(b"committed").unwrap();
    fs.control()
        .arm_cut_after(Op::Fsync, "db/log", None)
        .unwrap();
    f.sync_data().unwrap();
    assert_eio(f.write_all(b" after"));
    drop(f);
    fs.control().revive("/").unwrap();
    assert_eq!(fs::read(m.join("db/log")).unwrap(), b"committed");
    assert_eq!(fs.control().fired().unwrap().len(), 2);
    fs.shutdown().unwrap();
}

/// Case 7a: Torn last write and bit flips.
#[test]
fn torn_write_and_bit_flip() {
    let mut fs = mount();
    let m = fs.mountpoint().to_path_buf();
    let mut f = File::create(m.join("seg")).unwrap();
    f.write_all(b"0123456789").unwrap();
    f.sync_all().unwrap();
    sync_dir(&m);
    f.write_all_at(b"zz", 0).unwrap(); // earlier unsynced write: dropped
    f.write_all_at(b"ABCDEFGHIJ", 6).unwrap(); // last write: first 5 bytes land
    fs.control().torn("seg").unwrap();
    drop(f);
    crash(&mut fs, "/");
    assert_eq!(fs::read(m.join("seg")).unwrap(), b"012345ABCDE");

    fs.control().flip("seg", 1, 0).unwrap();
    fs.control().flip("seg", 2, 7).unwrap();
    let want = [b'0', b'1' ^ 1, b'2' ^ 0x80];
    assert_eq!(fs::read(m.join("seg")).unwrap()[..3], want);
    crash(&mut fs, "/");
    assert_eq!(
        fs::read(m.join("seg")).unwrap()[..3],
        want,
        "flip is at rest"
    );
    fs.shutdown().unwrap();
}

/// Case 7b: Injected ENOSPC/EIO on write and fsync; a failed fsync makes nothing durable.
#[test]
fn injected_errors() {
    let mut fs = mount();
    let m = fs.mountpoint().to_path_buf();
    let mut f = File::create(m.join("f")).unwrap();
    sync_dir(&m);
    fs.control()
        .fail(Op::Write, "f", libc::ENOSPC, Some(1))
        .unwrap();
    assert_errno(f.write_all(b"a"), libc::ENOSPC);
    f.write_all(b"a").unwrap();
    fs.control()
        .fail(Op::Write, "f", libc::EIO, Some(1))
        .unwrap();
    assert_eio(f.write_all(b"b"));
    assert_eq!(fs::read(m.join("f")).unwrap(), b"a");

    fs.control()
        .fail(Op::Fsync, "f", libc::EIO, Some(1))
        .unwrap();
    assert_eio(f.sync_all());
    fs.control()
        .fail(Op::Fsync, "", libc::ENOSPC, Some(1))
        .unwrap();
    assert_errno(f.sync_data(), libc::ENOSPC);
    fs.control().cut("/").unwrap();
    fs.control().revive("/").unwrap();
    assert_eq!(
        fs::read(m.join("f")).unwrap(),
        b"",
        "failed fsyncs synced nothing"
    );

    // Data kept dirty after a failed fsync becomes durable with the next good one.
    drop(f);
    let mut f = OpenOptions::new().write(true).open(m.join("f")).unwrap();
    f.write_all(b"retry").unwrap();
    fs.control()
        .fail(Op::Fsync, "f", libc::EIO, Some(1))
        .unwrap();
    assert_eio(f.sync_all());
    f.sync_all().unwrap();
    drop(f);
    crash(&mut fs, "/");
    assert_eq!(fs::read(m.join("f")).unwrap(), b"retry");

    // Injection on directory creation, until cleared.
    fs.control()
        .fail(Op::Mkdir, "", libc::EDQUOT, None)
        .unwrap();
    assert_errno(fs::create_dir(m.join("d1")), libc::EDQUOT);
    assert_errno(fs::create_dir(m.join("d2")), libc::EDQUOT);
    fs.control().clear().unwrap();
    fs::create_dir(m.join("d1")).unwrap();
    fs.shutdown().unwrap();
}

/// Case 7c: A space limit shows in statfs and makes growth fail with ENOSPC.
#[test]
fn space_limit() {
    let mut fs = mount();
    let m = fs.mountpoint().to_path_buf();
    let backing = statvfs(fs.backing());
    let s = statvfs(&m);
    assert_eq!(s.f_blocks, backing.f_blocks, "default: the backing FS");

    fs.control().space(Some(1 << 20)).unwrap();
    let s = statvfs(&m);
    assert_eq!(s.f_bavail * s.f_frsize, 1 << 20);
    let mut f = File::create(m.join("big")).unwrap();
    f.write_all(&vec![7u8; 512 << 10]).unwrap();
    let s = statvfs(&m);
    assert_eq!(s.f_bavail * s.f_frsize, 512 << 10);
    assert_errno(f.write_all(&vec![7u8; 600 << 10]), libc::ENOSPC);
    assert_errno(f.set_len(2 << 20), libc::ENOSPC);
    f.write_all_at(&[1u8; 4096], 0).unwrap(); // overwrite needs no space
    fs.control().space(None).unwrap();
    f.set_len(2 << 20).unwrap();
    assert_eq!(statvfs(&m).f_blocks, backing.f_blocks);
    drop(f);
    fs.shutdown().unwrap();
}

/// Case 8: Hard links: each name is as durable as its directory.
#[test]
fn hard_links() {
    let mut fs = mount();
    let m = fs.mountpoint().to_path_buf();
    fs::create_dir(m.join("a")).unwrap();
    fs::create_dir(m.join("b")).unwrap();
    sync_dir(&m);
    let mut f = File::create(m.join("a/f")).unwrap();
    f.write_all(b"linked").unwrap();
    f.sync_all().unwrap();
    drop(f);
    sync_dir(m.join("a"));
    fs::hard_link(m.join("a/f"), m.join("b/g")).unwrap();
    assert_eq!(fs::metadata(m.join("b/g")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(m.join("a/f")).unwrap().ino(),
        fs::metadata(m.join("b/g")).unwrap().ino()
    );
    crash(&mut fs, "/");
    assert!(
        names(m.join("b")).is_empty(),
        "b never synced: the link vanished"
    );
    assert_eq!(fs::metadata(m.join("a/f")).unwrap().nlink(), 1);

    fs::hard_link(m.join("a/f"), m.join("b/g")).unwrap();
    sync_dir(m.join("b"));
    fs::remove_file(m.join("a/f")).unwrap();
    crash(&mut fs, "/");
    assert_eq!(names(m.join("a")), ["f"], "unlink never synced");
    assert_eq!(fs::read(m.join("b/g")).unwrap(), b"linked");

    fs::remove_file(m.join("a/f")).unwrap();
    sync_dir(m.join("a"));
    crash(&mut fs, "/");
    assert!(names(m.join("a")).is_empty());
    assert_eq!(fs::read(m.join("b/g")).unwrap(), b"linked");
    assert_eq!(fs::metadata(m.join("b/g")).unwrap().nlink(), 1);
    fs.shutdown().unwrap();
}

/// The control protocol rejects bad commands; SIGTERM and Drop both unmount cleanly.
#[test]
fn control_errors_and_lifecycle() {
    let mut fs = mount();
    let mp = fs.mountpoint().to_path_buf();
    assert!(is_mounted(&mp));
    for bad in [
        "bogus",
        "arm cut nosuchop /",
        "fail write / EBADF",
        "cut no/such/dir",
    ] {
        let e = fs.control().command(bad).unwrap_err();
        assert!(e.to_string().contains(bad), "{e}");
    }
    assert_eq!(fs.control().command("ping").unwrap(), "");
    // A second control connection works alongside the first.
    let mut c2 = hashq_faultfs::Control::connect(fs.socket()).unwrap();
    assert_eq!(c2.stats().unwrap().dirs, 1);
    drop(fs); // Drop quits and unmounts
    assert!(!is_mounted(&mp));

    let base = std::env::temp_dir().join(format!("hashq-faultfs-sigterm-{}", std::process::id()));
    let (backing, mnt) = (base.join("b"), base.join("m"));
    fs::create_dir_all(&backing).unwrap();
    fs::create_dir_all(&mnt).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hashq-faultfs"))
        .arg("--backing")
        .arg(&backing)
        .arg("--mountpoint")
        .arg(&mnt)
        .arg("--control")
        .arg(base.join("c.sock"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    assert!(is_mounted(&mnt));
    // SAFETY: sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert!(child.wait().unwrap().success());
    assert!(!is_mounted(&mnt));
    fs::remove_dir_all(&base).unwrap();
}
